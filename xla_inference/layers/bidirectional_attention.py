"""Bidirectional (encoder-only) attention over a step's own tokens: BERT-style embedders.

Such a layer keeps no KV cache. vLLM schedules every prompt of an encoder-only model whole
in one step (it turns chunked prefill and prefix caching off for them), so a token attends
to every token of its own prompt, before and after it, and all of them are in the step.
The attention is a segment-masked product over the step's tokens, no pages: each token's
segment is its request's row, and the step's padding tokens get a segment of their own (a
full batch pads with the last row's id, which must not widen that row's keys).

Memory stays bounded for large steps: queries go in chunks, and a chunk reads only the keys
a prompt of at most `max_len` tokens can span around it (tokens of a prompt are contiguous).
"""

import jax
import jax.numpy as jnp

PADDING_SEGMENT = -1
_QUERY_CHUNK = 256


def token_segments(seq_ids: jax.Array, logits_indices: jax.Array) -> jax.Array:
    """[T] int32: each real token's request row, PADDING_SEGMENT for the step's padding.
    A row's tokens end at its logits index (its last scheduled token, runner/requests.py);
    tokens past it that carry its id are padding, as are those of rows without a request
    (logits index 0)."""
    T = seq_ids.shape[0]
    last = logits_indices[jnp.minimum(seq_ids, logits_indices.shape[0] - 1)]
    token = jnp.arange(T, dtype=jnp.int32)
    # A row without a request has logits index 0: its token 0 would count as real, but only
    # the padding of an otherwise empty step (warm-up) can sit there, and it reads nothing
    # real either way.
    return jnp.where(token <= last, seq_ids, PADDING_SEGMENT).astype(jnp.int32)


def _attend(q, k, v, q_segments, k_segments, scale: float):
    """q [C, N, H], k/v [S, N, H] (heads already matched) -> [C, N, H]: softmax over the
    keys of each query's segment, in float32. Every query has at least one key (itself,
    padding included), so no row is all masked."""
    scores = jnp.einsum("cnh,snh->ncs", q.astype(jnp.float32), k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * scale
    same = q_segments[:, None] == k_segments[None, :]
    scores = jnp.where(same[None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("ncs,snh->cnh", probs, v.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(q.dtype)


def bidirectional_attention(q, k, v, segments, *, scale: float, max_len: int,
                            query_chunk: int = _QUERY_CHUNK):
    """q [T, N, H], k/v [T, K, Hv] (N a multiple of K: grouped queries), segments [T]
    (token_segments) -> out [T, N, Hv]: each token attends to every token of its segment.

    max_len: the longest a segment can be (vLLM's max_model_len); a query chunk reads the
    keys within max_len - 1 tokens of it, which holds its tokens' whole prompts."""
    T, N, _ = q.shape
    K = k.shape[1]
    if N != K:
        k, v = jnp.repeat(k, N // K, axis=1), jnp.repeat(v, N // K, axis=1)
    window = query_chunk + 2 * (max_len - 1)
    if T <= window:  # one block: every key
        return _attend(q, k, v, segments, segments, scale)
    num_chunks = -(-T // query_chunk)
    pad = num_chunks * query_chunk - T
    q_padded = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
    seg_padded = jnp.pad(segments, (0, pad), constant_values=PADDING_SEGMENT)

    def chunk(i):
        start = i * query_chunk
        qc = jax.lax.dynamic_slice_in_dim(q_padded, start, query_chunk)
        qs = jax.lax.dynamic_slice_in_dim(seg_padded, start, query_chunk)
        # The start clamped into [0, T - window] (by hand: dynamic_slice would wrap a
        # negative one): the window still holds every key of the chunk's prompts, which
        # all lie inside [0, T).
        key_start = jnp.clip(start - (max_len - 1), 0, T - window)
        kc = jax.lax.dynamic_slice_in_dim(k, key_start, window)
        vc = jax.lax.dynamic_slice_in_dim(v, key_start, window)
        ks = jax.lax.dynamic_slice_in_dim(segments, key_start, window)
        # A chunk's padded query tail (segment PADDING_SEGMENT) may find no key in the
        # window: give it its own score row of zeros rather than NaN (it is cut off below).
        out = _attend(qc, kc, vc, qs, ks, scale)
        return jnp.where((qs == PADDING_SEGMENT)[:, None, None] & ~jnp.any(
            qs[:, None] == ks[None, :], axis=1)[:, None, None], 0, out)

    out = jax.lax.map(chunk, jnp.arange(num_chunks, dtype=jnp.int32))
    return out.reshape(num_chunks * query_chunk, N, -1)[:T]
