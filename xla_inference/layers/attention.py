"""Attention over the paged KV cache (write this step's K/V, then ragged attention), and the
self-attention block around it: projections, optional q/k norms, rope."""

import dataclasses

import jax

from xla_inference.kernels.metadata import AttentionMetadata, LayerCache
from xla_inference.kernels.ragged_paged_attention import ragged_paged_attention, write_kv
from xla_inference.layers.linear import linear
from xla_inference.layers.norms import rms_norm
from xla_inference.layers.rope import apply_rope
from xla_inference.parallel.axes import weight



def paged_attention(q, k, v, kv: LayerCache, md: AttentionMetadata, *, scale: float,
                    sliding_window: int | None = None,
                    soft_cap: float | None = None, attention_chunk: int | None = None,
                    k_scale=1.0, v_scale=1.0):
    """q [T, N, H], k/v [T, K, H] -> (updated layer cache, out [T, N, H]), through the block
    table of the layer's KV cache group.
    attention_chunk: keys only from the query's own chunk of that many positions (Llama 4).
    k_scale, v_scale: an fp8 cache stores k / k_scale and v / v_scale (floats or scalars;
    kernels/ragged_paged_attention.py); a cache of the activations' dtype ignores them."""
    slot_mapping, block_tables = md.group(kv.group)
    k_cache, v_cache = write_kv(kv.arrays[0], kv.arrays[1], k, v, slot_mapping, k_scale, v_scale)
    out = ragged_paged_attention(
        q, k_cache, v_cache, md.seq_ids, md.positions, block_tables,
        block_size=md.block_size, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
        attention_chunk=attention_chunk, k_scale=k_scale, v_scale=v_scale,
    )
    return LayerCache((k_cache, v_cache), kv.group), out


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SelfAttention:
    """Projections of one attention layer; the optional parts are None where a family has none."""

    # The checkpoint's [out, in] layout (layers/linear.py says why).
    wq: jax.Array = weight("heads", "embed", projection=True)  # [N*H, D]
    wk: jax.Array = weight("kv_heads", "embed", projection=True)  # [K*H, D]
    wv: jax.Array = weight("kv_heads", "embed", projection=True)  # [K*H, D]
    wo: jax.Array = weight("embed", "heads", projection=True)  # [D, N*H]
    bq: jax.Array | None = weight("heads", default=None)  # [N*H] (Qwen2's q/k/v biases)
    bk: jax.Array | None = weight("kv_heads", default=None)  # [K*H]
    bv: jax.Array | None = weight("kv_heads", default=None)  # [K*H]
    bo: jax.Array | None = None  # [D]
    q_norm: jax.Array | None = None  # [H] RMSNorm weight over each head, before rope (Qwen3)
    k_norm: jax.Array | None = None  # [H]
    # [] float32: a checkpoint's KV cache scales (vLLM's k_scale / v_scale), used by an fp8
    # KV cache only; None: 1.0, vLLM's default when the checkpoint has none.
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None


def self_attention(p: SelfAttention, x, kv: LayerCache, md: AttentionMetadata,
                   inv_freq: jax.Array, *, head_dim: int, scale: float, norm_eps: float,
                   sliding_window: int | None = None, soft_cap: float | None = None,
                   qk_norm=rms_norm):
    """x [T, D] (already normed) -> (updated layer cache, out [T, D]): project, rope, paged
    attention.

    qk_norm(x, weight, eps) normalizes q and k per head where the layer has q/k norms
    (Gemma passes its (1 + w) norm).
    """
    T = x.shape[0]
    q = linear(x, p.wq, p.bq).reshape(T, -1, head_dim)  # [T, N, H]
    k = linear(x, p.wk, p.bk).reshape(T, -1, head_dim)  # [T, K, H]
    v = linear(x, p.wv, p.bv).reshape(T, -1, head_dim)
    if p.q_norm is not None:
        q = qk_norm(q, p.q_norm, norm_eps)
    if p.k_norm is not None:
        k = qk_norm(k, p.k_norm, norm_eps)
    q = apply_rope(q, md.positions, inv_freq)
    k = apply_rope(k, md.positions, inv_freq)
    kv, out = paged_attention(q, k, v, kv, md, scale=scale, sliding_window=sliding_window,
                              soft_cap=soft_cap, k_scale=_or_one(p.k_scale),
                              v_scale=_or_one(p.v_scale))
    return kv, linear(out.reshape(T, -1), p.wo, p.bo)


def _or_one(kv_cache_scale):
    return 1.0 if kv_cache_scale is None else kv_cache_scale
