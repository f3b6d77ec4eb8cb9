"""Ragged paged attention in plain jnp.

One call serves decode, prefill, chunked prefill and prefix-cache hits: every query token
attends to the keys of its own sequence at positions <= its own, read straight from the
paged cache. Keys are visited in chunks of `kv_chunk` positions by a while loop whose trip
count comes from the batch's longest sequence on device, so one compiled program (per padded
T) serves every mix and its work follows the actual context length, not `max_blocks`.

Einsum letters: T tokens, S key positions in a chunk, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite instead of -inf so that rows with no valid key in a chunk stay NaN-free.
_MASK_VALUE = -1e30


def write_kv(k_cache, v_cache, k_new, v_new, slot_mapping):
    """Scatter this step's K/V into their slots.

    k_cache, v_cache: [num_slots, K, H]; k_new, v_new: [T, K, H]; slot_mapping: [T] int32.
    Padding tokens write to the null page (block 0), so indices may repeat there.
    """
    k_cache = k_cache.at[slot_mapping].set(k_new.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[slot_mapping].set(v_new.astype(v_cache.dtype), mode="drop")
    return k_cache, v_cache


def _chunk_slots(block_tables, seq_ids, chunk_start, *, block_size, kv_chunk):
    """Cache slots [T, kv_chunk] of key positions chunk_start .. chunk_start+kv_chunk-1."""
    num_chunk_blocks = kv_chunk // block_size
    max_blocks = block_tables.shape[1]
    block_idx = chunk_start // block_size + jnp.arange(num_chunk_blocks, dtype=jnp.int32)
    # Blocks past the table end only hold positions beyond every sequence: masked later.
    block_idx = jnp.minimum(block_idx, max_blocks - 1)
    pages = block_tables[seq_ids[:, None], block_idx[None, :]]  # [T, C/bs]
    offsets = jnp.arange(block_size, dtype=jnp.int32)
    slots = pages[:, :, None] * block_size + offsets[None, None, :]
    return slots.reshape(seq_ids.shape[0], kv_chunk)


def _chunk_mask(positions, key_pos, sliding_window):
    """Valid (token, key) pairs [T, S]: causal, optionally within a sliding window."""
    mask = key_pos[None, :] <= positions[:, None]
    if sliding_window is not None:
        mask &= key_pos[None, :] > positions[:, None] - sliding_window
    return mask


def _chunk_scores(q, k, mask, soft_cap):
    """q [T, K, G, H] (pre-scaled, f32), k [T, S, K, H] -> masked f32 scores [T, K, G, S]."""
    scores = jnp.einsum("tkgh,tskh->tkgs", q, k.astype(jnp.float32))
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    return jnp.where(mask[:, None, None, :], scores, _MASK_VALUE)


def _online_softmax_update(carry, scores, mask, v):
    """Fold one chunk into the running (max, sum, accumulator)."""
    m, l, acc = carry
    m_new = jnp.maximum(m, scores.max(axis=-1))
    # A chunk with no valid key for a token would give exp(0) = 1 per masked key. A later
    # valid key rescales that away (alpha underflows to 0), but a token with no valid key
    # at all (sliding_window < 1) would average garbage; with where() it returns zeros.
    p = jnp.where(mask[:, None, None, :], jnp.exp(scores - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + p.sum(axis=-1)
    acc = alpha[..., None] * acc + jnp.einsum("tkgs,tskh->tkgh", p, v.astype(jnp.float32))
    return m_new, l, acc


def _num_chunks(seq_lens, kv_chunk):
    """Trip count from the longest sequence; at least 1 so that key 0 is always seen."""
    longest = jnp.max(seq_lens).astype(jnp.int32)
    return jnp.maximum((longest + kv_chunk - 1) // kv_chunk, 1)


def ragged_paged_attention(q, k_cache, v_cache, seq_ids, positions, block_tables, seq_lens,
                           *, block_size: int, scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, kv_chunk: int = 128):
    """Attention of T ragged query tokens over the paged KV cache.

    q: [T, N, H]; k_cache, v_cache: [num_slots, K, H], already holding this step's K/V;
    seq_ids: [T] int32, row of block_tables / seq_lens per token; positions: [T] int32;
    block_tables: [B, max_blocks] int32; seq_lens: [B] int32 (0 for padding rows).
    Token t sees keys s of its sequence with s <= positions[t] (and s > positions[t] - window).
    Returns [T, N, H] in q's dtype.
    """
    assert kv_chunk % block_size == 0, (kv_chunk, block_size)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    group = num_heads // num_kv_heads
    seq_ids = seq_ids.astype(jnp.int32)
    positions = positions.astype(jnp.int32)
    q_grouped = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * scale

    def body(state):
        i, carry = state
        chunk_start = i * kv_chunk
        slots = _chunk_slots(block_tables, seq_ids, chunk_start,
                             block_size=block_size, kv_chunk=kv_chunk)
        key_pos = chunk_start + jnp.arange(kv_chunk, dtype=jnp.int32)
        mask = _chunk_mask(positions, key_pos, sliding_window)
        scores = _chunk_scores(q_grouped, k_cache[slots], mask, soft_cap)
        return i + 1, _online_softmax_update(carry, scores, mask, v_cache[slots])

    num_chunks = _num_chunks(seq_lens, kv_chunk)
    stats_shape = (num_tokens, num_kv_heads, group)
    init = (jnp.full(stats_shape, _MASK_VALUE, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, head_dim), jnp.float32))
    _, (_, l, acc) = jax.lax.while_loop(lambda s: s[0] < num_chunks, body, (jnp.int32(0), init))
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
