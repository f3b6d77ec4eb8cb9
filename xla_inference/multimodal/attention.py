"""Softmax attention of the vision towers (multimodal/), inside segments (a window, a frame,
an image), shaped for XLA's CPU backend as measured on it: batch dimensions leading in the
dots, the softmax's division after the product with v, long segments' queries in chunks."""

import jax
import jax.numpy as jnp

# Queries taken at most this many at a time in a long segment (a full block's frame): a
# chunk's [heads, chunk, S] scores stay in cache where the whole [heads, S, S] would not.
QUERY_CHUNK = 128


def segment_attention(q, k, v, valid, scale):
    """Softmax attention inside each segment: q, k, v [segments, heads, S, d] -> q's shape.
    valid [segments, S]: the keys that are rows of the segment (None: all)."""
    def attend(queries):
        scores = jnp.einsum("ghqd,ghkd->ghqk", queries, k).astype(jnp.float32) * scale
        if valid is not None:  # the padded keys of a short window
            scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
        # The softmax's division after the product with v: one pass less over the scores.
        weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        out = jnp.einsum("ghqk,ghkd->ghqd", weights.astype(v.dtype), v)
        return out / jnp.sum(weights, axis=-1, keepdims=True).astype(v.dtype)

    g, h, s, d = q.shape
    chunks = -(-s // QUERY_CHUNK)
    if chunks == 1:
        return attend(q)
    size = -(-s // chunks)  # equal chunks; the last one's padded queries are dropped
    q = jnp.pad(q, ((0, 0), (0, 0), (0, chunks * size - s), (0, 0)))
    out = jax.lax.map(attend, jnp.moveaxis(q.reshape(g, h, chunks, size, d), 2, 0))
    return jnp.moveaxis(out, 0, 2).reshape(g, h, chunks * size, d)[:, :, :s]
