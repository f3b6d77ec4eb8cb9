"""Ragged paged attention in plain jnp.

One call serves decode, prefill, chunked prefill and prefix-cache hits: every query token
attends to the keys of its own sequence at positions <= its own, read straight from the
paged cache. One compiled program (per padded T) serves every mix: the split of the work
is computed on device from seq_ids, and every loop's trip count follows the actual
positions, not `max_blocks`.

The token axis is cut into runs of equal seq_id (a request's tokens are contiguous; the
runner's padding tokens form a run of their own). Two paths share the work:
- decode tokens (runs of one token) are batched, in groups of similar context length.
  Each token gathers its own key pages chunk by chunk; with only G query rows per kv
  head, scores and values are products summed over the gathered chunk (multiply-reduce),
  which XLA's CPU backend runs faster than batched dots. Gathering the pages is most of
  the cost of this path.
- every other run is cut into tiles of `tile` consecutive tokens. A tile gathers its
  sequence's key pages once per chunk, for all its tokens, and runs real matmuls
  ([tile*G, H] x [H, chunk] per kv head). Small tiles (16) waste little on the short runs
  of chunked prefill while long prefills still run at matmul speed.

Einsum letters: T tokens, C key positions in a chunk, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim, D decode slots, M = tile * G query rows.

FP8 KV cache (vLLM's --kv-cache-dtype fp8 / fp8_e4m3 / fp8_e5m2): the cache arrays are
float8_e4m3fn or float8_e5m2, one byte per value. A row is written as value / scale
(k_scale for keys, v_scale for values: one float per layer, the layer's parameters
k_scale / v_scale where it has them, else 1.0 as in vLLM without checkpoint scales),
saturated to the format's largest finite value, and read back as float32 times the scale.
Both scales are folded out of the inner loops: k_scale into the query
(q . (k * s) = (q * s) . k) and v_scale into the output (sum p (v * s) = s * sum p v), so
the kernels only widen fp8 to float32. A cache of any other dtype ignores the scales, as
vLLM does for an unquantized cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xla_inference.kernels import backend as kernel_backend
from xla_inference.kernels import cpu_attention

# Finite instead of -inf so that rows with no valid key in a chunk stay NaN-free.
_MASK_VALUE = -1e30


FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


def is_fp8(dtype) -> bool:
    """Whether a cache of this dtype stores scaled fp8 values (see the module docstring)."""
    return jnp.dtype(dtype) in FP8_DTYPES


def to_cache_dtype(new, dtype, scale=1.0):
    """Rows as a cache of `dtype` stores them. fp8: new / scale, clipped to the format's
    largest finite value first, as vLLM's CUDA cache write saturates: a plain cast would
    turn a larger value into NaN (e4m3fn has no infinity) or inf (e5m2)."""
    if not is_fp8(dtype):
        return new.astype(dtype)
    limit = float(jnp.finfo(dtype).max)
    return jnp.clip(new.astype(jnp.float32) / scale, -limit, limit).astype(dtype)


def write_kv(k_cache, v_cache, k_new, v_new, slot_mapping, k_scale=1.0, v_scale=1.0):
    """Scatter this step's K/V into their slots (write_cache for each)."""
    return (write_cache(k_cache, k_new, slot_mapping, k_scale),
            write_cache(v_cache, v_new, slot_mapping, v_scale))


def write_cache(cache, new, slot_mapping, scale=1.0):
    """Scatter this step's rows into their slots of one cache array.

    cache: [num_slots, K, H]; new: [T, K, H]; slot_mapping: [T] int32; scale: the
    layer's k_scale or v_scale (a float or a traced scalar), used by an fp8 cache only.
    Padding tokens write to the null page (block 0), so indices may repeat there.

    One token is written as two equal rows to the same slot: XLA turns a one-row scatter
    into a dynamic-update-slice that it then duplicates into each consumer (the returned
    cache and the attention's page view), and copies the whole cache for each, four
    copies per layer (benchmarks/RESULTS.md, "Figures moved from code comments").
    """
    rows = to_cache_dtype(new, cache.dtype, scale)
    if _native_cpu_write_applies(cache.dtype):
        return cpu_attention.write_cache_rows(cache, rows, slot_mapping)
    if slot_mapping.shape[0] == 1:
        rows, slot_mapping = jnp.concatenate([rows, rows]), jnp.concatenate([slot_mapping] * 2)
    return cache.at[slot_mapping].set(rows, mode="drop")


def _native_cpu_write_applies(dtype) -> bool:
    """Whether the native CPU kernel writes this cache (kernels/cpu_attention.
    write_cache_rows): XLA's CPU scatter copies a bfloat16 or fp8 cache twice over; float32
    and float16 it scatters in place itself."""
    return ((jnp.dtype(dtype) == jnp.bfloat16 or is_fp8(dtype))
            and kernel_backend.attention_backend().name == kernel_backend.NATIVE
            and jax.default_backend() == "cpu" and cpu_attention.available())


# ---------------------------------------------------------------------------------------
# Shared pieces


def _key_mask(positions, key_pos, sliding_window, attention_chunk=None):
    """Valid (query, key) pairs [..., C]: causal, optionally within a sliding window and/or
    within the query's own chunk of `attention_chunk` positions (Llama 4's local layers)."""
    mask = key_pos <= positions[..., None]
    if sliding_window is not None:
        mask &= key_pos > positions[..., None] - sliding_window
    if attention_chunk is not None:
        mask &= key_pos // attention_chunk == positions[..., None] // attention_chunk
    return mask


def _cap(scores, soft_cap):
    return scores if soft_cap is None else soft_cap * jnp.tanh(scores / soft_cap)


def _softmax_step(carry, scores, mask, axis):
    """Fold one chunk's masked scores into the running (max, sum); returns probs, rescale.

    A chunk with no valid key for a row would give exp(0) = 1 per masked key. A later valid
    key rescales that away (alpha underflows to 0), but a row with no valid key at all
    (sliding_window < 1) would average garbage; with where() it returns zeros.
    """
    m, l = carry
    scores = jnp.where(mask, scores, _MASK_VALUE)
    m_new = jnp.maximum(m, scores.max(axis=axis))
    p = jnp.where(mask, jnp.exp(scores - jnp.expand_dims(m_new, axis)), 0.0)
    alpha = jnp.exp(m - m_new)
    return p, alpha, (m_new, alpha * l + p.sum(axis=axis))


def _visible_values(v, visible):
    """Values with every key no query sees set to zero, by a select.

    A chunk is gathered as whole pages, so it holds keys outside the window or past the
    sequence's end: pages a sliding-window group freed (the null page 0, or a stale id now
    another group's), the null page beyond the block table's end. Their probabilities are
    already 0, but 0 * NaN or 0 * inf is NaN: whatever those pages hold must not reach the
    output, so they are selected away, never multiplied by zero."""
    return jnp.where(visible, v, jnp.zeros((), v.dtype))


def _gather_chunk(cache_pages, block_tables, rows, first_block, num_blocks, kv_shape):
    """Keys (or values) [..., num_blocks * block_size, K, H] of blocks first_block.. of
    each row in `rows`, gathered as whole pages.

    cache_pages: [num_pages, block_size * K * H], one row per page: gathering whole
    contiguous rows is the cheapest gather XLA's CPU backend emits.
    """
    block_idx = first_block + jnp.arange(num_blocks, dtype=jnp.int32)
    # Blocks past the table end only hold positions beyond every sequence: masked later.
    block_idx = jnp.minimum(block_idx, block_tables.shape[1] - 1)
    pages = block_tables[rows[..., None], block_idx]  # [..., num_blocks]
    return cache_pages[pages].reshape(*pages.shape[:-1], -1, *kv_shape)


def _gather_keys_values(k_pages, v_pages, block_tables, rows, first_block, num_blocks,
                        kv_shape, shared_kv):
    """Keys and values [..., num_blocks * block_size, K, H] of one chunk, each cache's rows
    of shape kv_shape. With shared_kv (MLA's latent cache, see ragged_paged_attention) the
    one cache's row is the key and also its own value."""
    k = _gather_chunk(k_pages, block_tables, rows, first_block, num_blocks, kv_shape)
    if shared_kv:
        return k, k
    return k, _gather_chunk(v_pages, block_tables, rows, first_block, num_blocks, kv_shape)


def _first_chunk(min_pos, sliding_window, kv_chunk, attention_chunk=None):
    """First chunk that holds a key some query (lowest position min_pos) can see."""
    first_key = jnp.int32(0)
    if sliding_window is not None:
        first_key = jnp.maximum(min_pos - sliding_window + 1, 0)
    if attention_chunk is not None:
        first_key = jnp.maximum(first_key, min_pos // attention_chunk * attention_chunk)
    return first_key // kv_chunk


# ---------------------------------------------------------------------------------------
# Work split: which tokens are decode tokens, and the tiles of the others


def _token_runs(seq_ids):
    """First index and length [T] of each token's run of equal seq_id."""
    num_tokens = seq_ids.shape[0]
    idx = jnp.arange(num_tokens, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones(1, bool), seq_ids[1:] != seq_ids[:-1]])
    ends = jnp.concatenate([seq_ids[1:] != seq_ids[:-1], jnp.ones(1, bool)])
    run_first = jax.lax.cummax(jnp.where(starts, idx, 0))
    run_last = jax.lax.cummin(jnp.where(ends, idx, num_tokens - 1), reverse=True)
    return run_first, run_last - run_first + 1


def _split_work(seq_ids, *, num_decode_slots, tile):
    """Decode slots and tiles.

    Returns decode_idx [D] (token per decode slot; T where empty), num_decode, tile_first
    [T] (first token of each tile, in token order), tile_len [T], num_tiles. Runs of one
    token beyond the D decode slots fall back to one-token tiles.
    """
    num_tokens = seq_ids.shape[0]
    idx = jnp.arange(num_tokens, dtype=jnp.int32)
    run_first, run_len = _token_runs(seq_ids)
    single = run_len == 1
    is_decode = single & (jnp.cumsum(single) <= num_decode_slots)
    (decode_idx,) = jnp.nonzero(is_decode, size=num_decode_slots, fill_value=num_tokens)
    # A tile starts every `tile` tokens of a run; every tile holds a token, so T bounds
    # the count (the loop over tiles only runs num_tiles times).
    starts_tile = ~is_decode & ((idx - run_first) % tile == 0)
    (tile_first,) = jnp.nonzero(starts_tile, size=num_tokens, fill_value=0)
    run_end = run_first + run_len
    tile_len = jnp.minimum(run_end[tile_first] - tile_first, tile)
    num_decode = jnp.sum(is_decode, dtype=jnp.int32)
    return decode_idx, num_decode, tile_first, tile_len, jnp.sum(starts_tile, dtype=jnp.int32)


# ---------------------------------------------------------------------------------------
# Decode path: one query token per sequence, many sequences


def _decode_group(q, positions, rows, valid, k_pages, v_pages, block_tables, *,
                  block_size, kv_chunk, sliding_window, soft_cap, attention_chunk, shared_kv):
    """q [D, K, G, H] (pre-scaled f32) -> out [D, K, G, H] f32; invalid slots see no key."""
    num_slots, num_kv_heads, group, head_dim = q.shape
    num_blocks = kv_chunk // block_size
    kv_shape = (num_kv_heads, head_dim)
    masked_pos = jnp.where(valid, positions, -1)  # invalid slots: every key masked
    hi = jnp.max(masked_pos) + 1
    lo = _first_chunk(jnp.min(jnp.where(valid, positions, hi)), sliding_window, kv_chunk,
                      attention_chunk)

    def body(state):
        i, m, l, acc = state
        k, v = _gather_keys_values(k_pages, v_pages, block_tables, rows, i * num_blocks,
                                   num_blocks, kv_shape, shared_kv)  # [D, C, K, H]
        key_pos = i * kv_chunk + jnp.arange(kv_chunk, dtype=jnp.int32)
        visible = _key_mask(masked_pos, key_pos, sliding_window, attention_chunk)  # [D, C]
        mask = visible[:, None, None, :]  # [D, 1, 1, C]
        v = _visible_values(v, visible[..., None, None])
        # Products and sums over the gathered layout, not einsums: XLA's CPU backend runs
        # these as fused multiply-reduce kernels straight on the gathered chunk, about 1.5-2x
        # faster than batched dots with only G rows (which also needed transposed copies).
        scores = jnp.sum(q[:, None] * k[:, :, :, None, :].astype(jnp.float32), axis=-1)
        scores = scores.transpose(0, 2, 3, 1)  # [D, C, K, G] -> [D, K, G, C]
        p, alpha, (m, l) = _softmax_step((m, l), _cap(scores, soft_cap), mask, axis=-1)
        pv = jnp.sum(p.transpose(0, 3, 1, 2)[..., None] * v[:, :, :, None, :].astype(jnp.float32),
                     axis=1)  # [D, C, K, G, H] summed over C
        return i + 1, m, l, alpha[..., None] * acc + pv

    return _run_online_softmax(body, lo, hi, kv_chunk, (num_slots, num_kv_heads, group), head_dim)


def _run_online_softmax(body, lo, hi, kv_chunk, stats, head_dim):
    """Loop `body` over key chunks lo .. ceil(hi / kv_chunk) carrying (chunk, max, sum, acc)
    of shape `stats` (+ head_dim for acc); return the normalised accumulator."""
    init = (lo, jnp.full(stats, _MASK_VALUE, jnp.float32), jnp.zeros(stats, jnp.float32),
            jnp.zeros((*stats, head_dim), jnp.float32))
    num_chunks = (hi + kv_chunk - 1) // kv_chunk
    _, _, l, acc = jax.lax.while_loop(lambda s: s[0] < num_chunks, body, init)
    return acc / jnp.maximum(l, 1e-30)[..., None]


def _all_decodes(q_grouped, positions, seq_ids, decode_idx, num_decode, k_pages, v_pages,
                 block_tables, *, decode_group, **kw):
    """Decode tokens in groups of `decode_group`, longest contexts first, so that each
    group's loop runs about as far as each of its tokens needs; groups without a token are
    skipped. Returns (token index [D], T where empty; out [D, K, G, H] f32)."""
    num_tokens = q_grouped.shape[0]
    safe_idx = jnp.minimum(decode_idx, num_tokens - 1)
    valid = jnp.arange(decode_idx.shape[0]) < num_decode
    order = jnp.argsort(-jnp.where(valid, positions[safe_idx], -1))  # empty slots last
    decode_idx, safe_idx, valid = decode_idx[order], safe_idx[order], valid[order]
    q_dec, pos_dec, rows_dec = q_grouped[safe_idx], positions[safe_idx], seq_ids[safe_idx]

    def body(state):
        g, out = state
        first = g * decode_group
        part = lambda x: jax.lax.dynamic_slice_in_dim(x, first, decode_group)  # noqa: E731
        res = _decode_group(part(q_dec), part(pos_dec), part(rows_dec), part(valid), k_pages,
                            v_pages, block_tables, **kw)
        return g + 1, jax.lax.dynamic_update_slice_in_dim(out, res, first, 0)

    num_groups = (num_decode + decode_group - 1) // decode_group
    init = (jnp.int32(0), jnp.zeros(q_dec.shape, jnp.float32))
    return decode_idx, jax.lax.while_loop(lambda s: s[0] < num_groups, body, init)[1]


# ---------------------------------------------------------------------------------------
# Tile path: up to `tile` consecutive query tokens of one sequence


def _tile_attention(q_tile, pos_tile, valid, row, k_pages, v_pages, block_tables, *,
                    block_size, kv_chunk, sliding_window, soft_cap, attention_chunk,
                    shared_kv):
    """q_tile [K, tile*G, H] (pre-scaled f32), pos_tile/valid [tile] -> [K, tile*G, H] f32."""
    num_kv_heads, num_rows, head_dim = q_tile.shape
    tile = pos_tile.shape[0]
    group = num_rows // tile
    num_blocks = kv_chunk // block_size
    kv_shape = (num_kv_heads, head_dim)
    masked_pos = jnp.where(valid, pos_tile, -1)
    hi = jnp.max(masked_pos) + 1
    lo = _first_chunk(jnp.min(jnp.where(valid, pos_tile, hi)), sliding_window, kv_chunk,
                      attention_chunk)
    # [tile, C] mask broadcast over kv heads and the G query heads of each token.
    row_pos = jnp.repeat(masked_pos, group)

    def body(state):
        i, m, l, acc = state
        k, v = _gather_keys_values(k_pages, v_pages, block_tables, row, i * num_blocks,
                                   num_blocks, kv_shape, shared_kv)
        k, v = k.astype(jnp.float32), v.astype(jnp.float32)
        key_pos = i * kv_chunk + jnp.arange(kv_chunk, dtype=jnp.int32)
        mask = _key_mask(row_pos, key_pos, sliding_window, attention_chunk)[None]  # [1, M, C]
        v = _visible_values(v, mask[0].any(axis=0)[:, None, None])  # keys some row sees
        scores = jnp.einsum("kmh,ckh->kmc", q_tile, k)
        p, alpha, (m, l) = _softmax_step((m, l), _cap(scores, soft_cap), mask, axis=-1)
        pv = jnp.einsum("kmc,ckh->kmh", p, v)
        return i + 1, m, l, alpha[..., None] * acc + pv

    return _run_online_softmax(body, lo, hi, kv_chunk, (num_kv_heads, num_rows), head_dim)


def _all_tiles(q_grouped, positions, seq_ids, tile_first, tile_len, num_tiles, k_pages,
               v_pages, block_tables, *, tile, **kw):
    """Run every tile; returns out [T, K, G, H] f32, right at the tiles' tokens (junk or
    zeros elsewhere)."""
    num_tokens, num_kv_heads, group, head_dim = q_grouped.shape
    # Pad the token axis so that a tile's window never runs past the end (a clamped
    # dynamic_slice would shift it onto other tokens).
    q_pad = jnp.pad(q_grouped, ((0, tile), (0, 0), (0, 0), (0, 0)))
    pos_pad = jnp.pad(positions, (0, tile))
    out = jnp.zeros((num_tokens + tile, num_kv_heads, group, head_dim), jnp.float32)

    def body(state):
        i, out = state
        first, n = tile_first[i], tile_len[i]
        q_tile = jax.lax.dynamic_slice_in_dim(q_pad, first, tile)  # [tile, K, G, H]
        q_tile = q_tile.transpose(1, 0, 2, 3).reshape(num_kv_heads, tile * group, head_dim)
        pos_tile = jax.lax.dynamic_slice_in_dim(pos_pad, first, tile)
        valid = jnp.arange(tile) < n
        res = _tile_attention(q_tile, pos_tile, valid, seq_ids[first], k_pages, v_pages,
                              block_tables, **kw)
        res = res.reshape(num_kv_heads, tile, group, head_dim).transpose(1, 0, 2, 3)
        # Rows past the tile's own n tokens get junk, but tiles run in token order: those
        # rows belong to later tiles, to decode tokens (written after all tiles) or to the
        # padding past T, so every junk row is overwritten or dropped.
        return i + 1, jax.lax.dynamic_update_slice_in_dim(out, res, first, 0)

    _, out = jax.lax.while_loop(lambda s: s[0] < num_tiles, body, (jnp.int32(0), out))
    return out[:num_tokens]


# ---------------------------------------------------------------------------------------

def _check_shapes(q, k_cache, v_cache, block_size, shared_kv, kv_chunk, decode_chunk) -> None:
    """Caller errors, raised at trace time with the shapes that disagree."""
    if kv_chunk % block_size or decode_chunk % block_size:
        raise ValueError(f"kv_chunk {kv_chunk} and decode_chunk {decode_chunk} must be whole "
                         f"pages of {block_size}")
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not group over {k_cache.shape[1]} kv heads")
    if q.shape[2] != k_cache.shape[2]:
        raise ValueError(f"query head dim {q.shape[2]} differs from the cache's {k_cache.shape[2]}")
    if shared_kv != (v_cache is None):
        raise ValueError("shared_kv takes one cache (v_cache=None); otherwise both are needed")
    if v_cache is not None and v_cache.shape != k_cache.shape:
        raise ValueError(f"K cache {k_cache.shape} and V cache {v_cache.shape} differ")


def _native_cpu_kernel_applies(k_cache) -> bool:
    return ((k_cache.dtype in (jnp.float32, jnp.bfloat16) or is_fp8(k_cache.dtype))
            and jax.default_backend() == "cpu" and cpu_attention.available())


def ragged_paged_attention(q, k_cache, v_cache, seq_ids, positions, block_tables,
                           *, block_size: int, scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, attention_chunk: int | None = None,
                           shared_kv: bool = False, kv_chunk: int = 64,
                           tile: int = 16, decode_chunk: int = 32, decode_group: int = 32,
                           native: bool = True, k_scale=1.0, v_scale=1.0):
    """Attention of T ragged query tokens over the paged KV cache.

    q: [T, N, H]; k_cache, v_cache: [num_slots, K, H], already holding this step's K/V;
    seq_ids: [T] int32, row of block_tables per token (a request's tokens contiguous);
    positions: [T] int32; block_tables: [B, max_blocks] int32. The work follows
    positions: no sequence lengths are needed.
    Token t sees keys s of its sequence with s <= positions[t] (and s > positions[t] - window;
    and s // attention_chunk == positions[t] // attention_chunk).
    shared_kv (multi-head latent attention, absorbed): k_cache [num_slots, 1, H] holds one
    vector per token, which is its key and also its value; v_cache is None.
    Tuning knobs (static): tile, query tokens per tile; kv_chunk, keys per step of a tile;
    decode_group, decode tokens per batch of the decode path; decode_chunk, keys per step
    of the decode path. Returns [T, N, H] in q's dtype.
    native: the kernel backend of this process (kernels/backend.py: by default the native
    CPU kernel, kernels/cpu_attention.py, on the CPU where it can serve the call: float32,
    bfloat16 or fp8 cache; the Pallas kernel on a TPU or GPU, for all but shared K/V);
    False: these plain-jnp paths always (the reference the other kernels are tested
    against).
    k_scale, v_scale: an fp8 cache's dequantization scales (floats or traced scalars;
    shared_kv reads its one cache with k_scale); other caches ignore them.
    """
    _check_shapes(q, k_cache, v_cache, block_size, shared_kv, kv_chunk, decode_chunk)
    if native:
        backend = kernel_backend.attention_backend()
        if backend.is_pallas and not shared_kv:
            kernel = kernel_backend.pallas_attention(backend)
            return kernel(q, k_cache, v_cache, seq_ids, positions, block_tables,
                          block_size=block_size, scale=scale, sliding_window=sliding_window,
                          soft_cap=soft_cap, attention_chunk=attention_chunk,
                          k_scale=k_scale, v_scale=v_scale, interpret=backend.interpret)
        if backend.is_pallas:
            kernel_backend.note_fallback(
                backend, "MLA's shared K/V cache is served by the jnp kernel (the Pallas "
                "kernels take separate K and V caches)")
        native = backend.name == kernel_backend.NATIVE
    out_dtype = q.dtype
    q, v_scale = _fold_cache_scales(q, k_cache.dtype, k_scale, k_scale if shared_kv else v_scale)
    if native and _native_cpu_kernel_applies(k_cache):
        # A shared K/V (MLA's latent cache) is the one cache read as keys and as values.
        out = cpu_attention.paged_attention(q, k_cache, k_cache if shared_kv else v_cache,
                                            seq_ids, positions, block_tables,
                                            block_size=block_size, scale=scale,
                                            sliding_window=sliding_window, soft_cap=soft_cap,
                                            attention_chunk=attention_chunk)
        return _unscale_values(out, v_scale).astype(out_dtype)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    seq_ids = seq_ids.astype(jnp.int32)
    positions = positions.astype(jnp.int32)
    # A free reshape: pages are contiguous runs of block_size slots.
    page_shape = (-1, block_size * num_kv_heads * k_cache.shape[2])
    k_pages = k_cache.reshape(page_shape)
    v_pages = k_pages if shared_kv else v_cache.reshape(page_shape)
    q_grouped = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * scale
    # Each decode token is its own request, so there are at most B of them; round the
    # slots up to whole groups.
    decode_group = min(decode_group, num_tokens, block_tables.shape[0])
    num_decode_slots = -(-min(num_tokens, block_tables.shape[0]) // decode_group) * decode_group
    decode_idx, num_decode, tile_first, tile_len, num_tiles = _split_work(
        seq_ids, num_decode_slots=num_decode_slots, tile=min(tile, num_tokens))
    kw = dict(block_size=block_size, sliding_window=sliding_window, soft_cap=soft_cap,
              attention_chunk=attention_chunk, shared_kv=shared_kv)

    out = _all_tiles(q_grouped, positions, seq_ids, tile_first, tile_len, num_tiles, k_pages,
                     v_pages, block_tables, tile=min(tile, num_tokens), kv_chunk=kv_chunk, **kw)
    decode_idx, dec = _all_decodes(q_grouped, positions, seq_ids, decode_idx, num_decode,
                                   k_pages, v_pages, block_tables, decode_group=decode_group,
                                   kv_chunk=decode_chunk, **kw)
    out = out.at[decode_idx].set(dec, mode="drop")
    out = _unscale_values(out.reshape(num_tokens, num_heads, head_dim), v_scale)
    return out.astype(out_dtype)


def write_kv_and_attend(q, k_new, v_new, slot_mapping, k_cache, v_cache, seq_ids, positions,
                        block_tables, *, block_size: int, scale: float,
                        sliding_window: int | None = None, soft_cap: float | None = None,
                        attention_chunk: int | None = None, k_scale=1.0, v_scale=1.0):
    """write_kv, then ragged_paged_attention over the written caches; one kernel call
    where the process's backend has a kernel that writes the rows itself (pallas-tpu:
    write_and_attend). Returns (k_cache, v_cache, out)."""
    kw = dict(block_size=block_size, scale=scale, sliding_window=sliding_window,
              soft_cap=soft_cap, attention_chunk=attention_chunk, k_scale=k_scale,
              v_scale=v_scale)
    backend = kernel_backend.attention_backend()
    fused = kernel_backend.pallas_write_and_attend(backend) if backend.is_pallas else None
    if fused is not None:
        return fused(q, k_new, v_new, slot_mapping, k_cache, v_cache, seq_ids, positions,
                     block_tables, interpret=backend.interpret, **kw)
    k_cache, v_cache = write_kv(k_cache, v_cache, k_new, v_new, slot_mapping, k_scale, v_scale)
    return k_cache, v_cache, ragged_paged_attention(q, k_cache, v_cache, seq_ids, positions,
                                                    block_tables, **kw)


def _fold_cache_scales(q, cache_dtype, k_scale, v_scale):
    """(q with an fp8 cache's k_scale folded in, in float32; the v_scale left to apply to
    the output); (q, None) for any other cache, which ignores its scales."""
    if not is_fp8(cache_dtype):
        return q, None
    return q.astype(jnp.float32) * k_scale, v_scale


def _unscale_values(out, v_scale):
    return out if v_scale is None else out * v_scale
