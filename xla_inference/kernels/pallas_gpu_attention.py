"""Ragged paged attention for NVIDIA GPUs: Pallas kernels lowered through Triton.

The same contract as kernels/ragged_paged_attention.py (`ragged_paged_attention`, cache
already written, no shared K/V): T ragged query tokens, each attending to the keys of its
own sequence (row `seq_ids[t]` of `block_tables`) at positions <= its own, optionally
within a sliding window and/or its own attention chunk, with an optional logit soft cap
and an fp8 cache whose k_scale / v_scale are folded out of the inner loop.

Two kernels share each call, the work split on device from seq_ids (runs of equal seq_id,
as the jnp kernel cuts them):
- tiles: every run longer than one token (prefill, chunked prefill, prefix hits, the
  runner's padding) is cut into tiles of `tile_tokens` consecutive tokens. One program
  takes a tile and one kv head: its rows are the tile's tokens times the G query heads of
  that kv head (GQA packed into the rows of one matmul), and it walks the keys in chunks
  of `kv_chunk` with an online softmax. Programs take tiles grid-stride (tile i, i + P,
  ...), so any number of tiles is served by a grid sized for the usual case.
- decode: every run of one token (up to `num_decode_slots` of them; any beyond take the
  tile path as one-token tiles) gets program instances per kv head *and per split* of
  its context (split-K): split s of S walks its share of the key chunks and writes its
  partial (max, sum, unnormalised output); a jnp merge outside the kernel combines the S
  partials. Batch-1 long-context decode thus runs K * S programs instead of K.

Keys are gathered per key, not per page: a chunk's key positions are looked up in the
block table (pages of any size, shuffled, the null page) and each key row is one
contiguous load of H values, as a pointer gather in Triton. Nothing is copied out of the
cache; the query and output are read and written in place by token index.

Triton tiles are powers of two, dots at least 16 wide: the G query heads of a decode
token are padded to 16 rows, and a head dim that is no power of two (80, 96) or under 16
is padded to the next one in registers (the cache and q stay as they are).

Numerics follow the jnp kernel: scores in float32 (bf16 products accumulate in float32;
float32 products use IEEE precision, never TF32), masked scores a finite -1e30, a row with
no visible key gives zeros, and keys no row sees are selected to zero before the value
product (freed or stale pages may hold NaN or inf).

The kernels lower to Triton (compiler_params of Pallas Triton); `interpret=True` runs the
same kernels through Pallas's interpreter on any backend (how the tests prove them on a
CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from xla_inference.kernels.backend import product_precision
from xla_inference.kernels.ragged_paged_attention import is_fp8

# Finite instead of -inf so that rows with no valid key stay NaN-free (as the jnp kernel).
_MASK_VALUE = -1e30
# Decode programs aimed at per call: a few waves of an H100/H200's 132 SMs.
_TARGET_DECODE_PROGRAMS = 1024
_MIN_DOT = 16  # Triton's tl.dot needs every dimension >= 16


def paged_attention(q, k_cache, v_cache, seq_ids, positions, block_tables, *,
                    block_size: int, scale: float, sliding_window: int | None = None,
                    soft_cap: float | None = None, attention_chunk: int | None = None,
                    k_scale=1.0, v_scale=1.0, interpret: bool = False,
                    tile_rows: int | None = None, kv_chunk: int | None = None,
                    max_splits: int = 32, num_decode_slots: int | None = None,
                    num_warps: int | None = None, num_stages: int = 2):
    """Attention of T ragged query tokens over the paged KV cache -> [T, N, H] in q's dtype.

    q: [T, N, H]; k_cache, v_cache: [num_slots, K, H] (this step's K/V already written);
    seq_ids, positions: [T] int32; block_tables: [B, max_blocks] int32. Semantics as
    ragged_paged_attention (see the module docstring there).
    Tuning knobs (static): tile_rows, query rows per tile program (tokens * G, rounded to a
    power of two); kv_chunk, keys per inner step (power of two >= 16); max_splits, most
    splits of one decode token's context; num_decode_slots, decode tokens given split-K
    programs (default min(T, B + 1)); num_warps / num_stages, Triton's.
    """
    _check_arguments(q, k_cache, v_cache, block_size)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    itemsize = max(jnp.dtype(q.dtype).itemsize, jnp.dtype(k_cache.dtype).itemsize)
    cfg = _config(num_tokens, group, head_dim, block_tables.shape[0], num_kv_heads, itemsize,
                  tile_rows=tile_rows, kv_chunk=kv_chunk, max_splits=max_splits,
                  num_decode_slots=num_decode_slots, num_warps=num_warps)
    kernel_kw = dict(block_size=block_size, sliding_window=sliding_window, soft_cap=soft_cap,
                     attention_chunk=attention_chunk, kv_chunk=cfg["kv_chunk"],
                     group=group, head_pad=cfg["head_pad"])
    call_kw = dict(interpret=interpret, compiler_params=pl_triton.CompilerParams(
        num_warps=cfg["num_warps"], num_stages=num_stages))
    scales = _scales(k_cache.dtype, scale, k_scale, v_scale)
    seq_ids = seq_ids.astype(jnp.int32)
    positions = positions.astype(jnp.int32)
    block_tables = block_tables.astype(jnp.int32)
    q4 = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    if num_tokens == 1:  # the batch-1 decode bucket: one decode token, no tiles, no plan
        plan = _single_token_plan(seq_ids, positions)
        o, m, total = _decode_call(q4, k_cache, v_cache, block_tables, scales, plan, cfg,
                                   kernel_kw, call_kw)
        out = _merge_splits(o, m, total)[:, :, :group, :head_dim] * scales[1]
        return out.astype(q.dtype).reshape(num_tokens, num_heads, head_dim)
    plan = _plan(seq_ids, positions, num_decode_slots=cfg["decode_slots"],
                 tile_tokens=cfg["tile_tokens"])
    tiles_out = _tile_call(q4, k_cache, v_cache, seq_ids, positions, block_tables, scales,
                           plan, cfg, kernel_kw, call_kw)
    o, m, total = _decode_call(q4, k_cache, v_cache, block_tables, scales, plan, cfg,
                               kernel_kw, call_kw)
    decoded = _merge_splits(o, m, total)[:, :, :group, :head_dim] * scales[1]  # [D, K, G, H]
    # Decode tokens' rows of tiles_out were never written: select, never blend.
    decoded_rows = jnp.zeros((num_tokens + 1, num_kv_heads, group, head_dim), jnp.float32)
    decoded_rows = decoded_rows.at[plan["decode_tok"]].set(decoded, mode="drop")[:num_tokens]
    out = jnp.where(plan["is_decode"][:, None, None, None], decoded_rows.astype(q.dtype),
                    tiles_out)
    return out.reshape(num_tokens, num_heads, head_dim)


# ---------------------------------------------------------------------------------------
# Static choices


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _config(num_tokens, group, head_dim, num_rows, num_kv_heads, itemsize, *, tile_rows,
            kv_chunk, max_splits, num_decode_slots, num_warps):
    """Tile, chunk and split sizes from the call's static shapes (itemsize: the widest of
    q's and the cache's element sizes, which sizes the staged K/V tiles)."""
    if tile_rows is None:
        tile_rows = 64 if head_dim <= 128 else 32
    if kv_chunk is None:
        # Keys staged per chunk, K and V, double-buffered, must fit a Hopper SM's 227 KiB of
        # shared memory beside the q tile: float32 rows of 256 (1 KiB each) took 232 KiB
        # at 32 keys on the H200, so the widest rows take 16.
        row_bytes = _next_pow2(head_dim) * itemsize
        kv_chunk = 64 if head_dim <= 128 else 32 if row_bytes <= 512 else 16
    if kv_chunk < _MIN_DOT or kv_chunk & (kv_chunk - 1):
        raise ValueError(f"kv_chunk {kv_chunk} must be a power of two >= {_MIN_DOT}")
    tile_tokens = max(1, min(tile_rows // group, num_tokens))
    rows = max(_MIN_DOT, _next_pow2(tile_tokens * group))
    if num_decode_slots is None:
        num_decode_slots = num_rows + 1  # one per request, and the runner's padding run
    decode_slots = max(1, min(num_decode_slots, num_tokens))
    splits = max(1, min(max_splits, _TARGET_DECODE_PROGRAMS // (decode_slots * num_kv_heads)))
    # Tiles: every full tile plus one partial tile per multi-token run; more is served
    # grid-stride (correct, slower).
    tile_programs = max(1, min(num_tokens, -(-num_tokens // tile_tokens)
                               + min(num_rows + 1, num_tokens // 2)))
    if num_warps is None:
        num_warps = 4 if head_dim <= 128 else 8
    return dict(tile_tokens=tile_tokens, tile_rows=rows, kv_chunk=kv_chunk,
                head_pad=max(_MIN_DOT, _next_pow2(head_dim)),
                decode_slots=decode_slots, splits=splits, tile_programs=tile_programs,
                group_rows=max(_MIN_DOT, _next_pow2(group)), num_warps=num_warps)


def _check_arguments(q, k_cache, v_cache, block_size) -> None:
    if v_cache is None or v_cache.shape != k_cache.shape:
        raise ValueError(f"K cache {k_cache.shape} and V cache "
                         f"{None if v_cache is None else v_cache.shape} must match "
                         "(shared K/V is not served by this kernel)")
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not group over {k_cache.shape[1]} kv heads")
    if q.shape[2] != k_cache.shape[2]:
        raise ValueError(f"query head dim {q.shape[2]} differs from the cache's {k_cache.shape[2]}")
    if k_cache.shape[0] % block_size:
        raise ValueError(f"{k_cache.shape[0]} cache slots are not whole pages of {block_size}")


def _scales(cache_dtype, scale, k_scale, v_scale):
    """[score multiplier, output multiplier] f32: the softmax scale times an fp8 cache's
    k_scale (q . (k * s) = s * (q . k)), and its v_scale (sum p (v * s) = s * sum p v).
    Other caches ignore the scales, as vLLM does. Traced scales are fine."""
    if not is_fp8(cache_dtype):
        k_scale = v_scale = 1.0
    return jnp.stack([jnp.float32(scale) * jnp.asarray(k_scale, jnp.float32),
                      jnp.asarray(v_scale, jnp.float32)])


# ---------------------------------------------------------------------------------------
# Work split (jnp, O(T), on device)


def _plan(seq_ids, positions, *, num_decode_slots, tile_tokens):
    """Decode slots and tiles.

    decode_tok [D]: token of each decode slot (T where empty); decode_pos [D]: its position
    (-1 where empty); decode_row [D]; is_decode [T]; tile_first / tile_len [T]: tiles in
    token order (only the first num_tiles meaningful); meta [1]: num_tiles.
    """
    num_tokens = seq_ids.shape[0]
    idx = jnp.arange(num_tokens, dtype=jnp.int32)
    new_run = jnp.concatenate([jnp.ones(1, bool), seq_ids[1:] != seq_ids[:-1]])
    run_ends = jnp.concatenate([seq_ids[1:] != seq_ids[:-1], jnp.ones(1, bool)])
    run_first = lax.cummax(jnp.where(new_run, idx, 0))
    run_last = lax.cummin(jnp.where(run_ends, idx, num_tokens - 1), reverse=True)
    single = run_first == run_last
    is_decode = single & (jnp.cumsum(single) <= num_decode_slots)
    (decode_tok,) = jnp.nonzero(is_decode, size=num_decode_slots, fill_value=num_tokens)
    decode_tok = decode_tok.astype(jnp.int32)
    filled = decode_tok < num_tokens
    safe_tok = jnp.minimum(decode_tok, num_tokens - 1)
    starts_tile = ~is_decode & ((idx - run_first) % tile_tokens == 0)
    (tile_first,) = jnp.nonzero(starts_tile, size=num_tokens, fill_value=0)
    tile_first = tile_first.astype(jnp.int32)
    tile_len = jnp.minimum(run_last[tile_first] + 1 - tile_first, tile_tokens)
    return dict(
        is_decode=is_decode, decode_tok=decode_tok, decode_safe_tok=safe_tok,
        decode_pos=jnp.where(filled, positions[safe_tok], -1),
        decode_row=seq_ids[safe_tok],
        tile_first=tile_first, tile_len=tile_len.astype(jnp.int32),
        meta=jnp.sum(starts_tile, dtype=jnp.int32)[None])


def _single_token_plan(seq_ids, positions):
    """_plan's decode fields for T = 1 (its token is a run of one): no device work."""
    return dict(decode_safe_tok=jnp.zeros(1, jnp.int32), decode_pos=positions,
                decode_row=seq_ids)


# ---------------------------------------------------------------------------------------
# In-kernel pieces


def _key_range(min_pos, max_pos, *, sliding_window, attention_chunk, kv_chunk):
    """Chunks [lo, hi) that hold a key some query of positions min_pos..max_pos sees."""
    first_key = jnp.int32(0)
    if sliding_window is not None:
        first_key = jnp.maximum(min_pos - sliding_window + 1, 0)
    if attention_chunk is not None:
        first_key = jnp.maximum(first_key, lax.div(jnp.maximum(min_pos, 0), attention_chunk)
                                * attention_chunk)
    hi = lax.div(max_pos + kv_chunk, kv_chunk)  # ceil((max_pos + 1) / kv_chunk), >= 0
    return jnp.minimum(lax.div(first_key, kv_chunk), hi), hi


def _visible(row_pos, key_pos, *, sliding_window, attention_chunk):
    """[rows, C]: causal, window, own attention chunk; rows at position -1 see nothing."""
    rp, kp = row_pos[:, None], key_pos[None, :]
    mask = kp <= rp
    if sliding_window is not None:
        mask &= kp > rp - sliding_window
    if attention_chunk is not None:
        mask &= lax.div(kp, attention_chunk) == lax.div(jnp.maximum(rp, 0), attention_chunk)
    return mask


def _chunk_slots(bt_ref, row, chunk, *, kv_chunk, block_size):
    """Key positions [C] of chunk `chunk` and their cache slots through row's block table
    (blocks past the table's end read its last entry: those keys are masked)."""
    key_pos = chunk * kv_chunk + lax.broadcasted_iota(jnp.int32, (kv_chunk,), 0)
    max_blocks = bt_ref.shape[1]
    block = jnp.minimum(lax.div(key_pos, block_size), max_blocks - 1)
    pages = bt_ref[row, block]
    return key_pos, pages * block_size + lax.rem(key_pos, block_size)


def _attend_chunk(q, row_pos, carry, k_ref, v_ref, bt_ref, row, chunk, score_scale, *,
                  kv_chunk, block_size, sliding_window, soft_cap, attention_chunk, head_pad):
    """Fold one chunk of keys into (max, sum, acc) for query rows q [R, H]."""
    m, total, acc = carry
    key_pos, slots = _chunk_slots(bt_ref, row, chunk, kv_chunk=kv_chunk,
                                  block_size=block_size)
    dot_dtype = q.dtype
    k = _load_rows(k_ref, (slots,), head_pad).astype(dot_dtype)  # one contiguous row a key
    precision = product_precision(dot_dtype)
    scores = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32) * score_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    mask = _visible(row_pos, key_pos, sliding_window=sliding_window,
                    attention_chunk=attention_chunk)
    scores = jnp.where(mask, scores, _MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(scores, axis=1))
    p = jnp.where(mask, jnp.exp(scores - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    seen = jnp.max(jnp.where(mask, 1, 0), axis=0) > 0  # keys some row sees
    v = jnp.where(seen[:, None], _load_rows(v_ref, (slots,), head_pad).astype(dot_dtype), 0)
    pv = lax.dot_general(p.astype(dot_dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)
    return m_new, alpha * total + jnp.sum(p, axis=1), alpha[:, None] * acc + pv


def _run_chunks(q, row_pos, lo, hi, k_ref, v_ref, bt_ref, row, score_scale, **kw):
    rows, head_dim = q.shape
    init = (jnp.full((rows,), _MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    body = lambda j, carry: _attend_chunk(q, row_pos, carry, k_ref, v_ref, bt_ref, row,  # noqa: E731
                                          j, score_scale, **kw)
    return lax.fori_loop(lo, hi, body, init)


def _load_rows(ref, index, head_pad):
    """Rows ref[*index, :] as [R, head_pad]: index holds int arrays [R] (and scalars). A head
    dim that is no power of two (or under 16) is padded to head_pad lanes for Triton's
    power-of-two tiles: the lanes past it read the last real lane again (in bounds) and are
    zeroed, so they add nothing to q . k; their outputs are sliced off outside."""
    head_dim = ref.shape[-1]
    if head_dim == head_pad:
        return ref[(*index, slice(None))]
    lanes = lax.broadcasted_iota(jnp.int32, (1, head_pad), 1)
    index = tuple(i[:, None] if i.ndim else i for i in index)
    rows = ref[(*index, jnp.minimum(lanes, head_dim - 1))]
    return jnp.where(lanes < head_dim, rows, jnp.zeros((), rows.dtype))


def _dot_dtype(q_dtype):
    """Products in bf16/f16 where the queries are (f32 accumulation), else in f32."""
    return q_dtype if jnp.dtype(q_dtype).itemsize == 2 else jnp.float32


# ---------------------------------------------------------------------------------------
# Tile kernel


def _tile_kernel(meta_ref, tile_first_ref, tile_len_ref, seq_ids_ref, pos_ref, scales_ref,
                 q_ref, k_ref, v_ref, bt_ref, o_ref, *, tile_rows, group,
                 num_programs, **kw):
    """Program (i, h): tiles i, i + P, ... for kv head h. q_ref: [T, G, H]; o_ref:
    [T + 1, G, head_pad] (row T: a sink for rows past a tile's end)."""
    i = pl.program_id(0)
    num_tokens = q_ref.shape[0]
    num_tiles = meta_ref[0]
    r = lax.broadcasted_iota(jnp.int32, (tile_rows,), 0)
    tok_off, g = lax.div(r, group), lax.rem(r, group)
    lanes = lax.broadcasted_iota(jnp.int32, (o_ref.shape[-1],), 0)
    score_scale, out_scale = scales_ref[0], scales_ref[1]

    def one_tile(n, carry):
        t = i + n * num_programs
        first, length = tile_first_ref[t], tile_len_ref[t]
        valid = tok_off < length  # also drops rows past tile_tokens * G
        tok = jnp.minimum(first + tok_off, num_tokens - 1)
        row_pos = jnp.where(valid, pos_ref[tok], -1)
        lo, hi = _key_range(jnp.min(jnp.where(valid, row_pos, jnp.iinfo(jnp.int32).max)),
                            jnp.max(row_pos), kv_chunk=kw["kv_chunk"],
                            sliding_window=kw["sliding_window"],
                            attention_chunk=kw["attention_chunk"])
        q = _load_rows(q_ref, (tok, g), kw["head_pad"]).astype(_dot_dtype(q_ref.dtype))
        _, total, acc = _run_chunks(q, row_pos, lo, hi, k_ref, v_ref, bt_ref, seq_ids_ref[first],
                                score_scale, **kw)
        out = acc * (out_scale / jnp.maximum(total, 1e-30))[:, None]
        # Rows outside the tile go to the spare token row T (whole-index scatter: the
        # interpreter takes no mixed slice/array store, Triton any).
        dst = jnp.where(valid, tok, num_tokens)[:, None]
        o_ref[dst, g[:, None], lanes[None, :]] = out.astype(o_ref.dtype)
        return carry

    trips = lax.div(jnp.maximum(num_tiles - i, 0) + num_programs - 1, num_programs)
    lax.fori_loop(0, trips, one_tile, 0)


def _whole(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _per_kv_head(shape, head_axis):
    """The whole array, kv head axis squeezed to the program's head (grid axis 1)."""
    block = tuple(pl.squeezed if a == head_axis else d for a, d in enumerate(shape))
    return pl.BlockSpec(block, lambda *ids: tuple(ids[1] if a == head_axis else 0
                                                  for a in range(len(shape))))


def _tile_call(q4, k_cache, v_cache, seq_ids, positions, block_tables, scales, plan, cfg,
               kernel_kw, call_kw):
    num_tokens, num_kv_heads, group, head_dim = q4.shape
    programs = cfg["tile_programs"]
    out_shape = (num_tokens + 1, num_kv_heads, group, cfg["head_pad"])
    kernel = functools.partial(_tile_kernel, tile_rows=cfg["tile_rows"],
                               num_programs=programs, **kernel_kw)
    in_specs = [_whole((1,)), _whole((num_tokens,)), _whole((num_tokens,)),
                _whole((num_tokens,)), _whole((num_tokens,)), _whole((2,)),
                _per_kv_head(q4.shape, 1), _per_kv_head(k_cache.shape, 1),
                _per_kv_head(v_cache.shape, 1), _whole(block_tables.shape)]
    return pl.pallas_call(
        kernel, grid=(programs, num_kv_heads), in_specs=in_specs,
        out_specs=_per_kv_head(out_shape, 1),
        out_shape=jax.ShapeDtypeStruct(out_shape, q4.dtype),
        name="ragged_paged_attention_tiles", **call_kw,
    )(plan["meta"], plan["tile_first"], plan["tile_len"], seq_ids, positions, scales, q4,
      k_cache, v_cache, block_tables)[:num_tokens, ..., :head_dim]


# ---------------------------------------------------------------------------------------
# Decode kernel (split-K) and the merge of its partials


def _decode_kernel(tok_ref, dpos_ref, drow_ref, scales_ref, q_ref, k_ref, v_ref, bt_ref,
                   o_ref, m_ref, l_ref, *, group, group_rows, num_splits, **kw):
    """Program (d, h, s): split s of decode slot d's key chunks, kv head h."""
    d, s = pl.program_id(0), pl.program_id(2)
    pos = dpos_ref[d]  # -1: empty slot, no chunk
    row_ids = lax.broadcasted_iota(jnp.int32, (group_rows,), 0)
    g = jnp.minimum(row_ids, group - 1)  # rows >= G: copies of the last head, not kept
    q = _load_rows(q_ref, (tok_ref[d], g), kw["head_pad"]).astype(_dot_dtype(q_ref.dtype))
    lo, hi = _key_range(pos, pos, kv_chunk=kw["kv_chunk"], sliding_window=kw["sliding_window"],
                        attention_chunk=kw["attention_chunk"])
    per_split = lax.div(hi - lo + num_splits - 1, num_splits)
    start = jnp.minimum(lo + s * per_split, hi)
    end = jnp.minimum(start + per_split, hi)
    row_pos = jnp.full((group_rows,), pos, jnp.int32)
    m, total, acc = _run_chunks(q, row_pos, start, end, k_ref, v_ref, bt_ref, drow_ref[d],
                            scales_ref[0], **kw)
    if o_ref.shape[0] == group_rows:  # G is a power of two >= 16: every row kept
        o_ref[...], m_ref[...], l_ref[...] = acc, m, total
        return
    # Only the G real rows are kept (partials are read again by the merge: at batch 1, 16
    # padded rows of 4 would add a quarter to the bytes of the KV read); the copies go to
    # the spare row G.
    dst = jnp.where(row_ids < group, row_ids, group)
    lanes = lax.broadcasted_iota(jnp.int32, (1, acc.shape[1]), 1)
    o_ref[dst[:, None], lanes] = acc
    m_ref[dst] = m
    l_ref[dst] = total


def _decode_call(q4, k_cache, v_cache, block_tables, scales, plan, cfg, kernel_kw, call_kw):
    num_tokens, num_kv_heads, group, head_dim = q4.shape
    slots, splits, rows = cfg["decode_slots"], cfg["splits"], cfg["group_rows"]

    kernel = functools.partial(_decode_kernel, group_rows=rows, num_splits=splits, **kernel_kw)

    part = lambda *tail: pl.BlockSpec((pl.squeezed,) * 3 + tail,  # noqa: E731
                                      lambda d, h, s: (d, h, s) + (0,) * len(tail))
    in_specs = [_whole((slots,)), _whole((slots,)), _whole((slots,)), _whole((2,)),
                _per_kv_head(q4.shape, 1), _per_kv_head(k_cache.shape, 1),
                _per_kv_head(v_cache.shape, 1), _whole(block_tables.shape)]
    kept = rows if rows == group else group + 1  # + the spare row
    stats = (slots, num_kv_heads, splits, kept)
    return pl.pallas_call(
        kernel, grid=(slots, num_kv_heads, splits), in_specs=in_specs,
        out_specs=[part(kept, cfg["head_pad"]), part(kept), part(kept)],
        out_shape=[jax.ShapeDtypeStruct((*stats, cfg["head_pad"]), jnp.float32),
                   jax.ShapeDtypeStruct(stats, jnp.float32),
                   jax.ShapeDtypeStruct(stats, jnp.float32)],
        name="ragged_paged_attention_decode", **call_kw,
    )(plan["decode_safe_tok"], plan["decode_pos"], plan["decode_row"], scales, q4, k_cache,
      v_cache, block_tables)


def _merge_splits(o, m, sums):
    """Combine split partials o [D, K, S, R, H], m, l [D, K, S, R] -> [D, K, R, H]."""
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - m_all)  # splits without a key: m = -1e30, weight 0 (or 1 with l = 0)
    total = jnp.sum(sums * w, axis=2)
    return jnp.sum(o * w[..., None], axis=2) / jnp.maximum(total, 1e-30)[..., None]

