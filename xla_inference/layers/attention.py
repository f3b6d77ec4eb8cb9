"""Attention over the paged KV cache: write this step's K/V, then ragged attention."""

import jax

from xla_inference.kernels.ragged_paged_attention import ragged_paged_attention, write_kv
from xla_inference.runner.batch import StepBatch


def paged_attention(q, k, v, kv: tuple[jax.Array, jax.Array], batch: StepBatch, *, scale: float,
                    sliding_window: int | None = None,
                    soft_cap: float | None = None):
    """q [T, N, H], k/v [T, K, H] -> (updated (k_cache, v_cache), out [T, N, H])."""
    k_cache, v_cache = write_kv(kv[0], kv[1], k, v, batch.slot_mapping)
    out = ragged_paged_attention(
        q, k_cache, v_cache, batch.seq_ids, batch.positions, batch.block_tables, batch.seq_lens,
        block_size=batch.block_size, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
    )
    return (k_cache, v_cache), out
