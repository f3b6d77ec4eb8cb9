"""Ragged paged attention as a Pallas kernel for TPUs (Mosaic).

The same call as kernels/ragged_paged_attention.py (mixed decode, prefill, chunked prefill
and prefix hits in one call; GQA; sliding window; soft cap; attention chunks; fp8 caches
with their scales), as one Pallas program per schedule:

- Work. The wrapper sorts the tokens by (seq_id, position), cuts them into runs of equal
  seq_id and schedules two calls of the same kernel: a decode call with one query token
  per program (every run of one token) and a tile call with up to `tile` tokens of one
  run per program (every other run, cut into tiles). The schedules differ only in the
  static tile size, so a decode-only step costs the decode call plus a tile call whose
  programs all skip, and a prefill-heavy step the other way round; both sizes follow the
  step's static shapes, so there is still one compiled program per padded token count.
  The number of scheduled programs is computed on the device; programs past it return at
  once and their block indices repeat the last real one (no copies).
- Metadata by scalar prefetch (SMEM): per program its block-table row, first page and
  page count; the flattened block tables; the score scale.
- Keys and values stay in HBM (memory space ANY). Each program walks its sequence's pages
  in chunks of `pages_per_chunk` pages: one DMA per page (pages are scattered), all pages
  of a chunk on one semaphore, into double-buffered VMEM scratch, the next chunk's copies
  started before the current chunk is computed; a program's last chunk starts the next
  program's first chunk (decode programs do not wait for their first copy).
- Online softmax (running max, sum and accumulator in VMEM scratch, float32).
- GQA: the G query heads of one kv head and the program's tokens form the rows of one
  matmul against that head's keys ([tile*G, H] x [H, C]).
- Lane packing: a page row holds all K heads, K*H values, contiguous. Where H < 128, `hp`
  kv heads (hp*H = 128 lanes where K allows) are served by one matmul: the wrapper lays
  the queries of those heads out block-diagonally ([hp*M, hp*H], zeros off the diagonal),
  so that one lane-dense product gives every row its own head's scores, and the product
  with the packed values gives each row its head's output in its own lane block, which
  the wrapper takes back out. The price is hp-fold MXU work on small heads (memory-bound
  steps do not notice); H a multiple of 128 takes aligned 128-lane slices, hp = 1.
- fp8 caches: pages are copied as fp8 (half of bf16's bytes) and widened in VMEM; k_scale
  is folded into the score scale, v_scale into the output, as the jnp path folds them.
- Garbage outside what a row may see (pages freed behind a sliding window, the null page,
  page slots past the table's end) is masked out of the scores and selected out of the
  values (0 * NaN would be NaN), as in the jnp path.

KV write: write_and_attend takes this step's K/V rows and writes them into their slots by
DMA at the start of the first program (the caches are aliased outputs, written in place),
before any page is read; paged_attention expects them written (write_kv).
Not done here: decode programs serve one token each; no megacore split (dimension semantics "arbitrary");
shared K/V (MLA) is served by the jnp path. On this CPU the kernel runs in Pallas' TPU
interpret mode (`interpret=True`), which simulates the DMAs, semaphores and VMEM; it has
not run on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_MASK_VALUE = -1e30  # finite, as in the jnp kernel: fully masked rows stay NaN-free
_LANES = 128
FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
# VMEM for the K/V double buffers: 2 slots x (K and V), well under the 16 MiB scoped VMEM
# default of v5e (32 MiB on v6e).
_KV_BUFFER_BYTES = 8 * 1024 * 1024


def paged_attention(q, k_cache, v_cache, seq_ids, positions, block_tables, *, block_size: int,
                    scale: float, sliding_window: int | None = None,
                    soft_cap: float | None = None, attention_chunk: int | None = None,
                    k_scale=1.0, v_scale=1.0, interpret: bool = False,
                    tile: int | None = None, pages_per_chunk: int | None = None):
    """Attention of T ragged query tokens over the paged KV cache; the contract of
    kernels/ragged_paged_attention.ragged_paged_attention (without shared K/V).

    q: [T, N, H]; k_cache, v_cache: [num_slots, K, H], already holding this step's K/V;
    seq_ids, positions: [T] int32; block_tables: [B, max_blocks] int32.
    k_scale, v_scale: an fp8 cache's scales (floats or traced scalars); other caches
    ignore them. interpret: run in Pallas' TPU interpret mode (any backend, slow): True, or
    a pltpu.InterpretParams.
    tile, pages_per_chunk: static schedule knobs (None: chosen from the shapes; tests set
    them small to cross every boundary). Returns [T, N, H] in q's dtype.
    """
    return _attend(q, k_cache, v_cache, None, seq_ids, positions, block_tables,
                   block_size=block_size, scale=scale, sliding_window=sliding_window,
                   soft_cap=soft_cap, attention_chunk=attention_chunk, k_scale=k_scale,
                   v_scale=v_scale, interpret=interpret, tile=tile,
                   pages_per_chunk=pages_per_chunk)[2]


def write_and_attend(q, k_new, v_new, slot_mapping, k_cache, v_cache, seq_ids, positions,
                     block_tables, **kwargs):
    """write_kv and paged_attention in one kernel: this step's K/V rows [T, K, H] are
    written to their slots (slot_mapping [T]; padding to the null page) by DMA at the
    start of the first program, into the cache buffers the kernel returns (aliased to
    its inputs: no copy where the caller's cache is donated), before any page is read.
    fp8 caches store value / scale, saturated, as write_cache does. kwargs: those of
    paged_attention. Returns (k_cache, v_cache, out)."""
    _check_shapes(q, k_cache, v_cache, kwargs["block_size"])
    fp8 = jnp.dtype(k_cache.dtype) in FP8_DTYPES
    width = k_cache.shape[1] * k_cache.shape[2]
    k_rows = _cache_rows(k_new, k_cache.dtype, kwargs.get("k_scale", 1.0) if fp8 else 1.0)
    v_rows = _cache_rows(v_new, v_cache.dtype, kwargs.get("v_scale", 1.0) if fp8 else 1.0)
    new_rows = (k_rows.reshape(-1, width), v_rows.reshape(-1, width),
                slot_mapping.astype(jnp.int32))
    return _attend(q, k_cache, v_cache, new_rows, seq_ids, positions, block_tables, **kwargs)


def _cache_rows(new, dtype, scale):
    """Rows as a cache of `dtype` stores them (ragged_paged_attention.to_cache_dtype's
    rule: fp8 saturates to its largest finite value)."""
    if jnp.dtype(dtype) not in FP8_DTYPES:
        return new.astype(dtype)
    limit = float(jnp.finfo(dtype).max)
    return jnp.clip(new.astype(jnp.float32) / scale, -limit, limit).astype(dtype)


def _attend(q, k_cache, v_cache, new_rows, seq_ids, positions, block_tables, *,
            block_size: int, scale: float, sliding_window=None, soft_cap=None,
            attention_chunk=None, k_scale=1.0, v_scale=1.0, interpret=False, tile=None,
            pages_per_chunk=None):
    """(k_cache, v_cache, out): paged_attention, after writing new_rows (None: nothing)."""
    _check_shapes(q, k_cache, v_cache, block_size)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if num_tokens == 0:
        return k_cache, v_cache, jnp.zeros_like(q)
    fp8 = jnp.dtype(k_cache.dtype) in FP8_DTYPES
    score_scale = jnp.asarray(scale, jnp.float32) * (k_scale if fp8 else 1.0)
    plan = _Plan.choose(q.dtype, k_cache.dtype, num_tokens=num_tokens, num_heads=num_heads,
                        num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                        max_blocks=block_tables.shape[1], num_rows=block_tables.shape[0],
                        tile=tile, pages_per_chunk=pages_per_chunk)
    order = jnp.lexsort((positions.astype(jnp.int32), seq_ids.astype(jnp.int32)))
    s_seq, s_pos = seq_ids.astype(jnp.int32)[order], positions.astype(jnp.int32)[order]
    q_sorted = jnp.concatenate([q[order], jnp.zeros((1, num_heads, head_dim), q.dtype)])
    decode_tokens, tile_tokens = _schedule(s_seq, plan)
    shared = dict(block_size=block_size, sliding_window=sliding_window, soft_cap=soft_cap,
                  attention_chunk=attention_chunk, interpret=interpret, plan=plan)
    pages = [c.reshape(-1, block_size, num_kv_heads * head_dim)  # free: pages are rows
             for c in (k_cache, v_cache)]
    tables = block_tables.astype(jnp.int32)
    out = jnp.zeros((num_tokens + 1, num_heads, head_dim), jnp.float32)
    # The first call writes the new rows (if any); the second reads the caches it returns.
    for tokens in (tile_tokens, decode_tokens):
        res, pages = _scheduled_call(q_sorted, s_seq, s_pos, tokens, *pages, tables,
                                     score_scale, new_rows, **shared)
        new_rows = None
        out = out.at[tokens.reshape(-1)].set(res, mode="drop")
    out = out[:num_tokens] * (v_scale if fp8 else 1.0)
    out = jnp.zeros_like(out).at[order].set(out).astype(q.dtype)
    return pages[0].reshape(k_cache.shape), pages[1].reshape(v_cache.shape), out


def _check_shapes(q, k_cache, v_cache, block_size) -> None:
    if v_cache is None or v_cache.shape != k_cache.shape:
        raise ValueError("the Pallas TPU kernel takes separate K and V caches of one shape "
                         "(shared K/V, MLA's latent cache, is served by the jnp kernel)")
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not group over {k_cache.shape[1]} kv heads")
    if q.shape[2] != k_cache.shape[2]:
        raise ValueError(f"query head dim {q.shape[2]} differs from the cache's {k_cache.shape[2]}")
    if k_cache.shape[0] % block_size:
        raise ValueError(f"{k_cache.shape[0]} cache slots are no whole pages of {block_size}")


# ---------------------------------------------------------------------------------------
# Static plan: tile sizes, lane packing, pages per DMA chunk


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static choices of one call, from the step's shapes."""

    group: int  # query heads per kv head
    num_kv_heads: int
    head_dim: int
    heads_per_pack: int  # kv heads served by one matmul (lane packing)
    tile: int  # tokens per program of the tile call
    pages_per_chunk: int  # pages per DMA chunk
    max_blocks: int  # the block table's width
    compute: str  # matmul input dtype
    num_decode: int  # programs of the decode call
    num_tiles: int  # programs of the tile call

    @classmethod
    def choose(cls, q_dtype, cache_dtype, *, num_tokens, num_heads, num_kv_heads, head_dim,
               block_size, max_blocks, num_rows, tile, pages_per_chunk):
        group = num_heads // num_kv_heads
        heads_per_pack = _heads_per_pack(num_kv_heads, head_dim)
        if tile is None:
            # About 256 rows (tile * G * hp) per matmul: the MXU's height on v6e, twice v5e's.
            tile = max(8, min(64, pl.next_power_of_2(max(1, 256 // (group * heads_per_pack)))))
        tile = max(1, min(tile, num_tokens))
        cache_dtype = jnp.dtype(cache_dtype)
        if pages_per_chunk is None:
            page_bytes = block_size * num_kv_heads * head_dim * cache_dtype.itemsize
            # 4 buffers (K and V, two slots) within the budget, about 512 keys per chunk.
            pages_per_chunk = max(1, min(_KV_BUFFER_BYTES // (4 * page_bytes),
                                         max(1, 512 // block_size)))
        pages_per_chunk = max(1, min(pages_per_chunk, max_blocks))
        compute = _compute_dtype(jnp.dtype(q_dtype), cache_dtype)
        # Runs of one token are at most one per block-table row (tokens are sorted by row);
        # longer runs number at most min(B, T // 2) and add at most one partial tile each.
        num_decode = min(num_tokens, num_rows)
        num_tiles = min(num_tokens, -(-num_tokens // tile) + min(num_rows, num_tokens // 2))
        return cls(group=group, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   heads_per_pack=heads_per_pack, tile=tile, pages_per_chunk=pages_per_chunk,
                   max_blocks=max_blocks, compute=compute.name, num_decode=num_decode,
                   num_tiles=max(num_tiles, 1))


def _heads_per_pack(num_kv_heads: int, head_dim: int) -> int:
    """kv heads served by one matmul: enough to fill the 128 lanes where H is smaller."""
    if head_dim >= _LANES:
        return 1
    return math.gcd(num_kv_heads, max(1, _LANES // head_dim))


def _compute_dtype(q_dtype, cache_dtype):
    """Matmul inputs: bf16 where both sides are (fp8 widens to q's dtype, exactly: every
    fp8 value is a bf16 value), float32 otherwise. Accumulation is always float32."""
    if cache_dtype in FP8_DTYPES:
        cache_dtype = q_dtype
    if q_dtype == jnp.bfloat16 and cache_dtype == jnp.bfloat16:
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.float32)


# ---------------------------------------------------------------------------------------
# Work split (on the device, outside the kernel)


def _schedule(s_seq, plan):
    """Token indices (into the sorted tokens; T for an empty place) of every program of
    the decode call [num_decode, 1] and of the tile call [num_tiles, tile]."""
    num_tokens = s_seq.shape[0]
    idx = jnp.arange(num_tokens, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones(1, bool), s_seq[1:] != s_seq[:-1]])
    ends = jnp.concatenate([s_seq[1:] != s_seq[:-1], jnp.ones(1, bool)])
    run_first = jax.lax.cummax(jnp.where(starts, idx, 0))
    run_end = jax.lax.cummin(jnp.where(ends, idx, num_tokens - 1), reverse=True) + 1
    single = run_end - run_first == 1
    (decode,) = jnp.nonzero(single, size=plan.num_decode, fill_value=num_tokens)
    starts_tile = ~single & ((idx - run_first) % plan.tile == 0)
    (tile_first,) = jnp.nonzero(starts_tile, size=plan.num_tiles, fill_value=num_tokens)
    offsets = jnp.arange(plan.tile, dtype=jnp.int32)
    safe_first = jnp.minimum(tile_first, num_tokens - 1)
    in_tile = (tile_first[:, None] + offsets < run_end[safe_first][:, None])
    tiles = jnp.where(in_tile & (tile_first[:, None] < num_tokens),
                      tile_first[:, None] + offsets, num_tokens)
    return decode[:, None].astype(jnp.int32), tiles.astype(jnp.int32)


def _first_visible_key(pos, sliding_window, attention_chunk):
    first = jnp.zeros_like(pos)
    if sliding_window is not None:
        first = jnp.maximum(pos - sliding_window + 1, 0)
    if attention_chunk is not None:
        first = jnp.maximum(first, pos // attention_chunk * attention_chunk)
    return first


def _scheduled_call(q_sorted, s_seq, s_pos, tokens, k_pages, v_pages, tables, score_scale,
                    new_rows, *, block_size, sliding_window, soft_cap, attention_chunk,
                    interpret, plan):
    """Run the kernel over programs of tokens [P, tile] (T: empty), after writing new_rows
    (or not: None); returns (their outputs [P * tile, N, H] float32 in the order of
    `tokens`, [k_pages, v_pages] as the kernel leaves them)."""
    num_programs, tile = tokens.shape
    num_tokens = s_seq.shape[0]
    valid = tokens < num_tokens
    safe = jnp.minimum(tokens, num_tokens - 1)
    pos = jnp.where(valid, s_pos[safe], -1)
    big = jnp.iinfo(jnp.int32).max
    hi = jnp.max(pos, axis=1) + 1  # keys below hi; 0 where the program has no token
    lo = jnp.min(jnp.where(valid, _first_visible_key(pos, sliding_window, attention_chunk),
                           big), axis=1)
    first_page = jnp.where(hi > 0, lo // block_size, 0)
    num_pages = jnp.where(hi > 0, (hi + block_size - 1) // block_size - first_page, 0)
    rows = s_seq[safe[:, 0]]
    num_work = jnp.sum(valid[:, 0], dtype=jnp.int32)[None]  # programs with tokens come first
    q_packed = _pack_queries(q_sorted[tokens], plan)
    row_pos = _row_positions(pos, plan)
    scalars = (rows.astype(jnp.int32), first_page.astype(jnp.int32),
               num_pages.astype(jnp.int32), tables.reshape(-1), score_scale[None], num_work)
    out, k_pages, v_pages = _call_kernel(
        scalars, q_packed, row_pos, k_pages, v_pages, new_rows, block_size=block_size,
        sliding_window=sliding_window, soft_cap=soft_cap, attention_chunk=attention_chunk,
        interpret=interpret, plan=plan)
    out = _unpack_outputs(out, plan, tile).reshape(num_programs * tile, -1, plan.head_dim)
    return out, [k_pages, v_pages]


def _pack_queries(q_tiles, plan):
    """[P, tile, N, H] -> [P, packs, hp*M, hp*H] in the compute dtype, M = tile*G: the rows
    of kv head p*hp + j are block j of pack p, their H values in lane block j, zeros in
    the others (see the module docstring)."""
    num_programs, tile = q_tiles.shape[:2]
    hp, g, h = plan.heads_per_pack, plan.group, plan.head_dim
    packs = plan.num_kv_heads // hp
    q = q_tiles.reshape(num_programs, tile, packs, hp, g, h).transpose(0, 2, 3, 1, 4, 5)
    q = q.reshape(num_programs, packs, hp, tile * g, 1, h)
    eye = jnp.eye(hp, dtype=q.dtype).reshape(1, 1, hp, 1, hp, 1)
    q = (q * eye).reshape(num_programs, packs, hp * tile * g, hp * h)
    return q.astype(plan.compute)


def _unpack_outputs(out, plan, tile):
    """[P, packs, hp*M, hp*H] -> [P, tile, N, H]: each row's own lane block."""
    num_programs, packs = out.shape[:2]
    hp, g, h = plan.heads_per_pack, plan.group, plan.head_dim
    out = out.reshape(num_programs, packs, hp, tile * g, hp, h)
    out = jnp.diagonal(out, axis1=2, axis2=4)  # [P, packs, M, H, hp]
    out = out.transpose(0, 1, 4, 2, 3).reshape(num_programs, packs * hp, tile, g, h)
    return out.transpose(0, 2, 1, 3, 4).reshape(num_programs, tile, packs * hp * g, h)


def _row_positions(pos, plan):
    """Position of every matmul row, -1 for empty places: [P, hp*M, 1] (rows along
    sublanes, to mask scores) and [P, 1, hp*M] (along lanes, to find the keys any row
    sees for the values)."""
    rows = jnp.tile(jnp.repeat(pos, plan.group, axis=1), (1, plan.heads_per_pack))
    return rows[:, :, None], rows[:, None, :]


# ---------------------------------------------------------------------------------------
# The kernel


def _call_kernel(scalars, q_packed, row_pos, k_pages, v_pages, new_rows, *, block_size,
                 sliding_window, soft_cap, attention_chunk, interpret, plan):
    """One pallas_call; returns (out, k_pages, v_pages): the caches as given, or with
    new_rows (k_rows [T, K*H], v_rows, slots [T]) written, in the same buffers."""
    num_programs, packs, num_rows, width = q_packed.shape
    pos_col, pos_lane = row_pos
    kv_width = k_pages.shape[-1]
    ppc = plan.pages_per_chunk
    write = new_rows is not None
    num_scalars = len(scalars) + write  # + the slots to write

    def block(i, *prefetched):
        # Programs past the scheduled ones repeat the last real block: no copy, no write.
        num_work_ref = prefetched[5]
        return jnp.minimum(i, jnp.maximum(num_work_ref[0] - 1, 0))

    q_spec = pl.BlockSpec((None, packs, num_rows, width), lambda i, *p: (block(i, *p), 0, 0, 0))
    col_spec = pl.BlockSpec((None, num_rows, 1), lambda i, *p: (block(i, *p), 0, 0))
    lane_spec = pl.BlockSpec((None, 1, num_rows), lambda i, *p: (block(i, *p), 0, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    kv_buffer = pltpu.VMEM((2, ppc, block_size, kv_width), k_pages.dtype)
    scratch = [kv_buffer, kv_buffer, pltpu.SemaphoreType.DMA((2, 2)),
               pltpu.VMEM((packs, num_rows, 1), jnp.float32),
               pltpu.VMEM((packs, num_rows, 1), jnp.float32),
               pltpu.VMEM((packs, num_rows, width), jnp.float32),
               pltpu.SMEM((2,), jnp.int32)]
    out_shape = jax.ShapeDtypeStruct(q_packed.shape, jnp.float32)
    operands = [*scalars, q_packed, pos_col, pos_lane, k_pages, v_pages]
    in_specs = [q_spec, col_spec, lane_spec, hbm, hbm]
    out_shapes, out_specs, aliases = [out_shape], [q_spec], {}
    if write:
        k_rows, v_rows, slots = new_rows
        operands = [*scalars, slots, q_packed, pos_col, pos_lane, k_pages, v_pages, k_rows,
                    v_rows]
        in_specs += [hbm, hbm]
        out_shapes += [jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                       jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)]
        out_specs += [hbm, hbm]
        aliases = {num_scalars + 3: 1, num_scalars + 4: 2}  # the caches, written in place
        scratch.append(pltpu.SemaphoreType.DMA((2,)))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=num_scalars, grid=(num_programs,), in_specs=in_specs,
        out_specs=out_specs, scratch_shapes=scratch)
    kernel = functools.partial(_attention_kernel, block_size=block_size,
                               sliding_window=sliding_window, soft_cap=soft_cap,
                               attention_chunk=attention_chunk, plan=plan, write=write)
    results = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shapes,
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=_interpret_params(interpret),
        name="xla_inference_ragged_paged_attention",
    )(*operands)
    if write:
        return tuple(results)
    return results[0], k_pages, v_pages


def _attention_kernel(*refs, block_size, sliding_window, soft_cap, attention_chunk, plan,
                      write):
    if write:
        (rows_ref, first_page_ref, num_pages_ref, tables_ref, scale_ref, num_work_ref,
         slots_ref, q_ref, pos_col_ref, pos_lane_ref, _, _, k_rows, v_rows, o_ref, k_hbm,
         v_hbm, k_buf, v_buf, sems, m_ref, l_ref, acc_ref, state_ref, write_sems) = refs
        # The caches' input and output refs are one buffer: read the pages from the output.
        _write_new_rows(slots_ref, k_rows, v_rows, k_hbm, v_hbm, write_sems, block_size)
    else:
        (rows_ref, first_page_ref, num_pages_ref, tables_ref, scale_ref, num_work_ref, q_ref,
         pos_col_ref, pos_lane_ref, k_hbm, v_hbm, o_ref, k_buf, v_buf, sems, m_ref, l_ref,
         acc_ref, state_ref) = refs
    i = pl.program_id(0)
    ppc = plan.pages_per_chunk
    num_work = num_work_ref[0]
    # state_ref (SMEM, kept across programs): [0] chunks fetched so far by this call (the
    # buffer slot of a chunk is its count mod 2); [1] 1 where the previous program has
    # already started this program's first chunk.

    def num_chunks_of(program):
        return (num_pages_ref[program] + ppc - 1) // ppc

    def for_each_copy(program, chunk, slot, action):
        """Start or wait for the DMAs of one chunk of `program`'s pages, K and V, all on
        the slot's semaphores (a loop, not unrolled: a chunk may hold dozens of pages).
        Page slots past the block table's end copy its last page: their keys lie past
        every position and are masked."""
        row, first_page = rows_ref[program], first_page_ref[program]

        def one_page(j, carry):
            block_idx = jnp.minimum(first_page + chunk * ppc + j, plan.max_blocks - 1)
            page = tables_ref[row * plan.max_blocks + block_idx]
            action(pltpu.make_async_copy(k_hbm.at[page], k_buf.at[slot, j], sems.at[0, slot]))
            action(pltpu.make_async_copy(v_hbm.at[page], v_buf.at[slot, j], sems.at[1, slot]))
            return carry

        jax.lax.fori_loop(0, ppc, one_page, 0)

    @pl.when(i == 0)
    def _():
        state_ref[0] = 0
        state_ref[1] = 0

    @pl.when(i < num_work)
    def _():
        first_page = first_page_ref[i]
        num_chunks = num_chunks_of(i)
        fetched = state_ref[0]
        m_ref[...] = jnp.full(m_ref.shape, _MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        @pl.when((num_chunks > 0) & (state_ref[1] == 0))
        def _():
            for_each_copy(i, 0, fetched % 2, lambda copy: copy.start())

        state_ref[1] = 0

        def body(chunk, carry):
            slot = (fetched + chunk) % 2
            next_slot = 1 - slot

            @pl.when(chunk + 1 < num_chunks)
            def _():
                for_each_copy(i, chunk + 1, next_slot, lambda copy: copy.start())

            # The last chunk: start the next program's first chunk, so that its copy
            # overlaps this chunk's compute (and the pipeline's output and query copies).
            @pl.when((chunk + 1 == num_chunks) & (i + 1 < num_work))
            def _():
                @pl.when(num_chunks_of(i + 1) > 0)
                def _():
                    for_each_copy(i + 1, 0, next_slot, lambda copy: copy.start())
                    state_ref[1] = 1

            for_each_copy(i, chunk, slot, lambda copy: copy.wait())
            first_key = (first_page + chunk * ppc) * block_size
            _fold_chunk(q_ref, pos_col_ref, pos_lane_ref, k_buf.at[slot], v_buf.at[slot],
                        m_ref, l_ref, acc_ref, first_key, scale_ref[0],
                        sliding_window=sliding_window, soft_cap=soft_cap,
                        attention_chunk=attention_chunk, plan=plan)
            return carry

        jax.lax.fori_loop(0, num_chunks, body, 0)
        state_ref[0] = fetched + num_chunks
        o_ref[...] = acc_ref[...] / jnp.maximum(l_ref[...], 1e-30)


def _write_new_rows(slots_ref, k_rows, v_rows, k_hbm, v_hbm, sems, block_size):
    """In the first program (programs run in order: every later page read sees them):
    copy each new K/V row [K*H] to its slot, all DMAs in flight together, then wait for
    them. Padding tokens all write the null page's slot 0: the same garbage, any order."""
    num_rows = k_rows.shape[0]

    def row_copies(t):
        slot = slots_ref[t]
        dst = (slot // block_size, pl.ds(slot % block_size, 1))
        return [pltpu.make_async_copy(k_rows.at[pl.ds(t, 1)], k_hbm.at[dst], sems.at[0]),
                pltpu.make_async_copy(v_rows.at[pl.ds(t, 1)], v_hbm.at[dst], sems.at[1])]

    def start(t, carry):
        for copy in row_copies(t):
            copy.start()
        return carry

    def wait(t, carry):
        for copy in row_copies(t):
            copy.wait()
        return carry

    @pl.when(pl.program_id(0) == 0)
    def _():
        jax.lax.fori_loop(0, num_rows, start, 0)
        jax.lax.fori_loop(0, num_rows, wait, 0)


def _interpret_params(interpret):
    """False (compile with Mosaic), or the TPU interpret mode's parameters: the defaults
    for True, or the caller's pltpu.InterpretParams (e.g. detect_races=True)."""
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or False


def _visible(row_pos, key_pos, sliding_window, attention_chunk):
    mask = key_pos <= row_pos
    if sliding_window is not None:
        mask &= key_pos > row_pos - sliding_window
    if attention_chunk is not None:
        mask &= key_pos // attention_chunk == row_pos // attention_chunk
    return mask


def _fold_chunk(q_ref, pos_col_ref, pos_lane_ref, k_ref, v_ref, m_ref, l_ref, acc_ref,
                first_key, score_scale, *, sliding_window, soft_cap, attention_chunk, plan):
    """One chunk of keys into the running softmax of every pack."""
    packs, num_rows, width = acc_ref.shape
    ppc, block_size, kv_width = k_ref.shape
    num_keys = ppc * block_size
    compute = jnp.dtype(plan.compute)
    k = k_ref[...].reshape(num_keys, kv_width).astype(compute)
    v = v_ref[...].reshape(num_keys, kv_width)
    key_lane = first_key + jax.lax.broadcasted_iota(jnp.int32, (1, num_keys), 1)
    key_col = first_key + jax.lax.broadcasted_iota(jnp.int32, (num_keys, 1), 0)
    mask = _visible(pos_col_ref[...], key_lane, sliding_window, attention_chunk)  # [R, C]
    # Keys that no row sees may hold anything (NaN included): select them out of V.
    # (A max over float32, not any() over booleans: Mosaic reduces 32-bit values.)
    seen = jnp.max(jnp.where(_visible(pos_lane_ref[...], key_col, sliding_window,
                                      attention_chunk), 1.0, 0.0),
                   axis=1, keepdims=True) > 0  # [C, 1]
    v = jnp.where(seen, v.astype(compute), jnp.zeros((), compute))
    for p in range(packs):
        lanes = slice(p * width, (p + 1) * width)
        scores = jax.lax.dot_general(q_ref[p], k[:, lanes], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32,
                                     precision=jax.lax.Precision.HIGHEST)
        scores = scores * score_scale
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        scores = jnp.where(mask, scores, _MASK_VALUE)
        m_prev = m_ref[p]
        m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
        probs = jnp.where(mask, jnp.exp(scores - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[p] = alpha * l_ref[p] + jnp.sum(probs, axis=1, keepdims=True)
        pv = jax.lax.dot_general(probs.astype(compute), v[:, lanes], (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32,
                                 precision=jax.lax.Precision.HIGHEST)
        acc_ref[p] = alpha * acc_ref[p] + pv
        m_ref[p] = m_new

