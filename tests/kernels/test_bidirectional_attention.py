"""Encoder-only attention (layers/bidirectional_attention.py) against float64 numpy: each
request's tokens attend to all of their prompt's tokens, never to another request's or to
the step's padding (including padding that carries the last row's id when every row is
taken), with grouped queries, in one block and in query chunks over a key window."""

import jax
import numpy as np
import pytest

from xla_inference.layers.bidirectional_attention import (PADDING_SEGMENT,
                                                          bidirectional_attention,
                                                          token_segments)


def _reference(q, k, v, lengths, scale):
    """float64 softmax attention within each prompt (prompts contiguous from token 0)."""
    N, K = q.shape[1], k.shape[1]
    out, start = np.zeros((sum(lengths), N, v.shape[2])), 0
    for n in lengths:
        for h in range(N):
            kh = h // (N // K)
            s = q[start:start + n, h] @ k[start:start + n, kh].T * scale
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[start:start + n, h] = (p / p.sum(axis=1, keepdims=True)) @ v[start:start + n, kh]
        start += n
    return out


def _step(lengths, T, B, seed=0):
    """A step as runner/requests.build_step_batch lays it out: rows' tokens in order, then
    padding with the first free row's id, or the last row's when all B rows are taken."""
    rng = np.random.default_rng(seed)
    seq_ids = np.full(T, len(lengths) if len(lengths) < B else B - 1, np.int32)
    logits_indices = np.zeros(B, np.int32)
    start = 0
    for row, n in enumerate(lengths):
        seq_ids[start:start + n] = row
        logits_indices[row] = start + n - 1
        start += n
    q = rng.normal(size=(T, 4, 8))
    k, v = rng.normal(size=(T, 2, 8)), rng.normal(size=(T, 2, 8))
    return q, k, v, seq_ids, logits_indices


def test_segments_mark_padding_after_a_full_batch():
    _, _, _, seq_ids, logits = _step([3, 2], T=8, B=2)
    np.testing.assert_array_equal(np.asarray(token_segments(seq_ids, logits)),
                                  [0, 0, 0, 1, 1] + [PADDING_SEGMENT] * 3)


@pytest.mark.parametrize("lengths,T,B,max_len,chunk", [
    ([5, 1, 9], 16, 4, 16, 256),       # one block, padding in a row of its own
    ([5, 1, 9], 16, 3, 16, 256),       # every row taken: padding carries row 2's id
    ([7, 12, 3, 9, 2], 40, 5, 12, 4),  # query chunks of 4 over a window of 4 + 2 * 11 keys
])
def test_matches_float64_reference(lengths, T, B, max_len, chunk):
    q, k, v, seq_ids, logits = _step(lengths, T, B)
    segments = token_segments(seq_ids, logits)
    out = jax.jit(lambda q, k, v, s: bidirectional_attention(
        q, k, v, s, scale=0.35, max_len=max_len, query_chunk=chunk))(
            q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), segments)
    n = sum(lengths)
    np.testing.assert_allclose(np.asarray(out)[:n], _reference(q, k, v, lengths, 0.35),
                               rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()  # padding rows too: they feed later layers
