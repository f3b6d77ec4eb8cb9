"""Gemma 3's image attention through every attention kernel: each image token attends up
to its image's last token (models/gemma3_mm._mask_positions hands the kernels that
position in place of its own, so a run of tokens shares one position), against a dense
float64 attention with transformers' mask, AND(sliding window, OR(causal, same image)),
for images that end inside the window (the ones served)."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from xla_inference.kernels import cpu_attention, pallas_gpu_attention, pallas_tpu_attention
from xla_inference.kernels.ragged_paged_attention import ragged_paged_attention

pytestmark = pytest.mark.slow  # the jnp kernel and Pallas' interpret mode compile for ~10 s

BLOCK, NUM_BLOCKS, MAX_BLOCKS, HEAD_DIM, HEADS, KV_HEADS = 8, 32, 8, 32, 4, 2
T = 48  # padded step
# Per sequence: (cached tokens, new tokens, the image's (first, last) position or None).
SEQS = [(5, 26, (9, 24)), (0, 12, None), (0, 9, (2, 7))]


def _kernels():
    return {
        "jnp": functools.partial(ragged_paged_attention, native=False),
        "native": cpu_attention.paged_attention,
        "pallas-tpu": functools.partial(pallas_tpu_attention.paged_attention, interpret=True),
        "pallas-gpu": functools.partial(pallas_gpu_attention.paged_attention, interpret=True),
    }


def _case(seed):
    rng = np.random.default_rng(seed)
    k_cache = np.zeros((NUM_BLOCKS * BLOCK, KV_HEADS, HEAD_DIM), np.float32)
    v_cache = np.zeros_like(k_cache)
    tables = np.zeros((4, MAX_BLOCKS), np.int32)
    pages = rng.permutation(np.arange(1, NUM_BLOCKS))
    q = np.zeros((T, HEADS, HEAD_DIM), np.float32)
    seq_ids = np.full(T, 3, np.int32)  # padding: a row of its own
    positions = np.zeros(T, np.int32)
    mask_positions = np.zeros(T, np.int32)
    seqs, start, used = [], 0, 0
    for row, (cached, new, image) in enumerate(SEQS):
        length = cached + new
        tables[row, :-(-length // BLOCK)] = pages[used:used + -(-length // BLOCK)]
        used += -(-length // BLOCK)
        k = rng.standard_normal((length, KV_HEADS, HEAD_DIM)).astype(np.float32)
        v = rng.standard_normal((length, KV_HEADS, HEAD_DIM)).astype(np.float32)
        places = np.arange(length)
        slots = tables[row, places // BLOCK] * BLOCK + places % BLOCK
        k_cache[slots], v_cache[slots] = k, v
        own = np.arange(cached, length)
        limit = own.copy()
        if image:
            inside = (own >= image[0]) & (own <= image[1])
            limit[inside] = image[1]
        q[start:start + new] = rng.standard_normal((new, HEADS, HEAD_DIM))
        seq_ids[start:start + new] = row
        positions[start:start + new], mask_positions[start:start + new] = own, limit
        seqs.append((start, own, image, k, v))
        start += new
    return q, k_cache, v_cache, seq_ids, positions, mask_positions, tables, seqs


def _reference(q, seqs, window):
    out = np.zeros(q.shape, np.float64)
    group = HEADS // KV_HEADS
    for start, own, image, k, v in seqs:
        keys = np.arange(k.shape[0])
        for i, p in enumerate(own):
            allowed = keys <= p
            if image and image[0] <= p <= image[1]:
                allowed |= (keys >= image[0]) & (keys <= image[1])
            if window:
                allowed &= keys > p - window
            for h in range(HEADS):
                s = (k[:, h // group] @ q[start + i, h].astype(np.float64)) * HEAD_DIM ** -0.5
                s = np.where(allowed, s, -np.inf)
                w = np.exp(s - s.max())
                out[start + i, h] = (w / w.sum()) @ v[:, h // group]
    return out


WINDOW = 26  # an image ends at 24: inside; the last text token's window starts past 4


@pytest.mark.parametrize("kernel", ["jnp", "native", "pallas-tpu", "pallas-gpu"])
def test_image_tokens_attend_to_their_whole_image(kernel):
    window = WINDOW
    if kernel == "native":
        assert cpu_attention.available(), "the native CPU attention kernel did not build"
    q, k_cache, v_cache, seq_ids, positions, mask_positions, tables, seqs = _case(0)
    out = _kernels()[kernel](jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(v_cache),
                             jnp.asarray(seq_ids), jnp.asarray(mask_positions),
                             jnp.asarray(tables), block_size=BLOCK, scale=HEAD_DIM ** -0.5,
                             sliding_window=window)
    expected = _reference(q, seqs, window)
    real = sum(new for _, new, _ in SEQS)
    np.testing.assert_allclose(np.asarray(out)[:real], expected[:real], atol=2e-5, rtol=0)
    # The widening matters: the image's first token differs from its causal attention.
    causal = _kernels()["jnp"](jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(v_cache),
                               jnp.asarray(seq_ids), jnp.asarray(positions), jnp.asarray(tables),
                               block_size=BLOCK, scale=HEAD_DIM ** -0.5, sliding_window=window)
    first = 9 - 5
    assert np.abs(np.asarray(causal)[first] - expected[first]).max() > 1e-2
