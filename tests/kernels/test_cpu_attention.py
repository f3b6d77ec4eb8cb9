"""The native CPU attention kernel at the head dims it compiles specially (64 and 128, as
compile-time constants) and at another one, against the plain-jnp kernel on the same
ragged step: decode tokens, tiles of one sequence longer and shorter than 16 tokens, a
sliding window, GQA. (test_ragged_paged_attention.py checks both against float64.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xla_inference.kernels import cpu_attention
from xla_inference.kernels.ragged_paged_attention import ragged_paged_attention

BLOCK = 16


def _step(rng, runs, num_tokens, num_kv_heads, head_dim, num_pages=128, max_blocks=40):
    """runs: (cached, new) per sequence, on shuffled pages; the rest of T is padding."""
    pages = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((len(runs) + 1, max_blocks), np.int32)
    seq_ids = np.full(num_tokens, len(runs), np.int32)  # padding: an empty row, position 0
    positions = np.zeros(num_tokens, np.int32)
    start, used = 0, 0
    for row, (cached, new) in enumerate(runs):
        n = -(-(cached + new) // BLOCK)
        tables[row, :n] = pages[used:used + n]
        used += n
        seq_ids[start:start + new] = row
        positions[start:start + new] = np.arange(cached, cached + new)
        start += new
    shape = (num_pages * BLOCK, num_kv_heads, head_dim)
    k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    return k, v, jnp.asarray(seq_ids), jnp.asarray(positions), jnp.asarray(tables)


@functools.partial(jax.jit, static_argnames=("native", "window"))
def _attend(q, k, v, seq_ids, positions, tables, *, native, window):
    return ragged_paged_attention(q, k, v, seq_ids, positions, tables, None, block_size=BLOCK,
                                  scale=q.shape[-1] ** -0.5, sliding_window=window,
                                  native=native)


@pytest.mark.parametrize("head_dim", [64, 128, 48])
@pytest.mark.parametrize("window", [None, 37])
def test_native_matches_jnp(head_dim, window):
    assert cpu_attention.available(), "the native CPU attention kernel did not build"
    rng = np.random.default_rng(head_dim)
    runs = [(300, 1), (0, 40), (100, 7), (17, 1), (250, 16), (5, 1), (0, 3)]
    num_heads, num_kv_heads, T = 12, 4, 96
    k, v, seq_ids, positions, tables = _step(rng, runs, T, num_kv_heads, head_dim)
    q = jnp.asarray(rng.standard_normal((T, num_heads, head_dim)), jnp.float32)
    native = _attend(q, k, v, seq_ids, positions, tables, native=True, window=window)
    plain = _attend(q, k, v, seq_ids, positions, tables, native=False, window=window)
    assert "xla_inference_paged_attention" in _attend.lower(
        q, k, v, seq_ids, positions, tables, native=True, window=window).as_text()
    np.testing.assert_allclose(np.asarray(native), np.asarray(plain), rtol=1e-5, atol=1e-5)
