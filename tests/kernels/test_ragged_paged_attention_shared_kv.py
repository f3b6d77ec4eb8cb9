"""ragged_paged_attention's shared_kv mode (multi-head latent attention) against the dense
reference: each token's key is its K and V cache rows joined, and is also its value.

The batches, caches and reference come from test_ragged_paged_attention; here the "K" and
"V" of each sequence are the two halves of one vector per token, in a single kv head.
Both kernels: the plain-jnp one and the native CPU one (which reads the one cache as keys
and as values).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels.test_ragged_paged_attention import (
    ALL_DECODE, BLOCK_SIZE, HEAD_DIM, MIXED, NUM_ROWS, ONE_PREFILL, _cache_with_context,
    _dense_reference, _make_batch, _round, _slots, _step_inputs)
from xla_inference.kernels.ragged_paged_attention import ragged_paged_attention, write_cache


@functools.partial(jax.jit, static_argnames=("scale", "knobs"))
def _step(cache, new, slot_mapping, q, seq_ids, positions, block_tables, *, scale, knobs=()):
    cache = write_cache(cache, new, slot_mapping)
    out = ragged_paged_attention(q, cache, None, seq_ids, positions, block_tables,
                                 block_size=BLOCK_SIZE, scale=scale, shared_kv=True,
                                 **dict(knobs))
    return cache, out


def _run_and_check(seed, specs, *, num_heads, dtype=jnp.float32, tol=1e-5, **knobs):
    rng = np.random.default_rng(seed)
    kw = dict(num_heads=num_heads, num_kv_heads=1, dtype=dtype)
    seqs, block_tables, seq_lens = _make_batch(rng, specs, **kw)
    _, k_new, v_new, seq_ids, positions, slot_mapping = _step_inputs(rng, seqs, block_tables, **kw)
    k_cache, v_cache = _cache_with_context(rng, seqs, block_tables, num_kv_heads=1, dtype=dtype)
    q = _round(rng.standard_normal((len(positions), num_heads, 2 * HEAD_DIM)), dtype)
    scale = (2 * HEAD_DIM) ** -0.5
    # One latent vector per token: the test's K and V rows side by side.
    cache = jnp.concatenate([jnp.asarray(k_cache), jnp.asarray(v_cache)], axis=-1)
    new = jnp.concatenate([jnp.asarray(k_new, dtype), jnp.asarray(v_new, dtype)], axis=-1)
    cache, out = _step(cache, new, slot_mapping, jnp.asarray(q, dtype), seq_ids, positions,
                       block_tables, scale=scale, knobs=tuple(sorted(knobs.items())))
    assert out.dtype == dtype and out.shape == q.shape
    out = np.asarray(out.astype(jnp.float32), np.float64)
    assert np.isfinite(out).all()
    cache = np.asarray(cache.astype(jnp.float32))
    for seq in seqs:
        all_pos = np.arange(seq["num_cached"] + seq["num_new"])
        latent = np.concatenate([seq["k"], seq["v"]], axis=-1)  # [len, 1, 2 * HEAD_DIM]
        np.testing.assert_array_equal(
            cache[_slots(block_tables[seq["row"]], all_pos)], latent.astype(np.float32))
        tokens = seq["tokens"]
        expected = _dense_reference(q[tokens], latent, latent, positions[tokens], scale=scale,
                                    sliding_window=None, soft_cap=None)
        np.testing.assert_allclose(out[tokens], expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("specs", [MIXED, ALL_DECODE, ONE_PREFILL],
                         ids=["mixed", "decode", "prefill"])
@pytest.mark.parametrize("native", [False, True], ids=["jnp", "native"])
def test_shared_kv_matches_dense(specs, native):
    _run_and_check(50, specs, num_heads=4, native=native)


def test_shared_kv_small_tiles_and_decode_groups():
    # The jnp kernel's tiles split runs and cross 16-key chunks; several decode groups.
    _run_and_check(51, MIXED, num_heads=8, kv_chunk=BLOCK_SIZE, tile=8,
                   decode_chunk=BLOCK_SIZE, decode_group=2, native=False)
    _run_and_check(52, ALL_DECODE, num_heads=8, decode_group=2, native=False)


@pytest.mark.parametrize("native", [False, True], ids=["jnp", "native"])
def test_shared_kv_bfloat16(native):
    _run_and_check(53, MIXED, num_heads=4, dtype=jnp.bfloat16, tol=1e-2, native=native)


@pytest.mark.parametrize("q_dim, v_cache, message", [
    (HEAD_DIM // 2, None, "query head dim"),
    (HEAD_DIM, jnp.zeros((4 * BLOCK_SIZE, 1, HEAD_DIM)), "one cache"),
])
def test_shared_kv_refuses_mismatched_inputs(q_dim, v_cache, message):
    cache = jnp.zeros((4 * BLOCK_SIZE, 1, HEAD_DIM))
    ids = jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match=message):
        ragged_paged_attention(jnp.zeros((4, 4, q_dim)), cache, v_cache, ids, ids,
                               jnp.zeros((NUM_ROWS, 4), jnp.int32),
                               block_size=BLOCK_SIZE, scale=1.0, shared_kv=True)
