"""Grouped matmul (MoE experts) in Pallas: the jax.lax.ragged_dot contract,

    gmm(lhs [M, K], rhs [E, K, N], group_sizes [E]) -> [M, N]

with lhs's rows sorted by group: the first group_sizes[0] rows times rhs[0], the next
group_sizes[1] times rhs[1], ...; rows past sum(group_sizes) come out zero. Two kernels
share one schedule: a TPU kernel (Mosaic) and a GPU kernel (Triton lowering). Both run in
Pallas interpret mode on any device (the tests' proof on the CPU).

The schedule (computed on the device from group_sizes, `group_metadata`): lhs is cut into
row tiles of `tm`. A group's rows span one or more consecutive tiles and a tile holds rows
of one or more groups, so the work is a list of (row tile, group) items, in row order, one
per group overlapping each tile (a tile with no group's rows: one item that writes zeros).
Empty groups get no item, so their weights are never read. There are at most
row_tiles + E - 1 items (each group boundary inside a tile adds one); the list is padded to
that static length with items that do nothing.

- TPU: grid (N tiles, items, K tiles). The item's row tile and group are scalar-prefetched
  (SMEM) and pick the lhs, rhs and output blocks; products accumulate in a float32 VMEM
  scratch over the K tiles, and the last K step writes the item's rows of the output
  block, keeping the rows other items wrote. An item's output block is the previous
  item's when they share a row tile, so the pipeline keeps it in VMEM between them and
  writes it back once. Padding items name the last item's blocks: no copies.
- GPU (Triton: no scalar prefetch, no scratch): grid (N tiles, items); each program reads
  its item from the metadata arrays, loops over K with masked-free block loads and
  accumulates in registers (float32), and stores only its own rows (plus, for the first
  item of a tile, the zero rows past the groups), so programs never write the same row.

Precision: products accumulate in float32 (`preferred_element_type`); a float32 product
asks for full precision (Triton otherwise rounds float32 inputs to TF32).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from xla_inference import envs
from xla_inference.kernels import backend as kernel_backend
from xla_inference.kernels import pallas_quantized_matmul as qmm

TPU, GPU = "tpu", "gpu"
BACKENDS = (TPU, GPU)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Block sizes: tm rows of lhs, tk of the contraction, tn output columns."""

    tm: int
    tk: int
    tn: int


# ------------------------------------------------------------------ backend choice

# The GMM follows the process's kernel choice (kernels/backend.py: XLA_INFERENCE_KERNELS,
# XLA_INFERENCE_PALLAS_INTERPRET): the Pallas TPU or GPU attention backend brings the GMM
# of that device, in the same mode. XLA_INFERENCE_GMM_BACKEND overrides it for the GMM
# alone: "tpu" or "gpu" (interpret mode off a device of that kind: the tests' way to run
# one kernel on the CPU) or "xla" (ragged_dot, whatever the attention backend).
GMM_BACKEND_VARIABLE = "XLA_INFERENCE_GMM_BACKEND"
GmmRoute = kernel_backend.PallasRoute  # backend ("tpu" or "gpu") and interpret mode


def gmm_route() -> GmmRoute | None:
    """Which Pallas GMM serves the MoE experts, or None for XLA's ragged_dot (the CPU):
    read when a layer is traced."""
    return kernel_backend.pallas_route(envs.gmm_backend(), GMM_BACKEND_VARIABLE)


# ------------------------------------------------------------------ the schedule

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GroupMetadata:
    """The work list: per item (padded to row_tiles + E - 1 items) its row tile, its group
    and flags; per group its first and past-the-last row."""

    item_tile: jax.Array  # [I] int32
    item_group: jax.Array  # [I] int32
    item_flags: jax.Array  # [I] int32: FIRST | VALID | HAS_GROUP bits
    group_starts: jax.Array  # [E] int32
    group_ends: jax.Array  # [E] int32


FIRST, VALID, HAS_GROUP = 1, 2, 4  # first item of its tile; not padding; multiplies a group


def group_metadata(group_sizes: jax.Array, row_tiles: int, tm: int) -> GroupMetadata:
    """The (row tile, group) items of lhs's row tiles of `tm` rows (module docstring)."""
    sizes = group_sizes.astype(jnp.int32)
    num_groups = sizes.shape[0]
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    total = ends[-1]
    tile_start = jnp.arange(row_tiles, dtype=jnp.int32) * tm
    tile_last = jnp.minimum(tile_start + tm, total) - 1
    has_rows = tile_start < total
    # The group holding a row: the first whose end lies past it (never an empty group).
    group_of = lambda row: jnp.minimum(  # noqa: E731
        jnp.searchsorted(ends, row, side="right"), num_groups - 1).astype(jnp.int32)
    first, last = group_of(tile_start), group_of(tile_last)
    rank = jnp.cumsum(sizes > 0) - 1  # [E]: the index of a non-empty group among them
    busy = jnp.nonzero(sizes > 0, size=num_groups, fill_value=0)[0].astype(jnp.int32)
    count = jnp.where(has_rows, rank[last] - rank[first] + 1, 1)  # items of each tile
    item_end = jnp.cumsum(count)
    num_items = row_tiles + num_groups - 1
    item = jnp.arange(num_items, dtype=jnp.int32)
    tile = jnp.minimum(jnp.searchsorted(item_end, item, side="right"), row_tiles - 1)
    offset = jnp.minimum(item - (item_end - count)[tile], count[tile] - 1)  # padding: last
    last_busy = busy[jnp.maximum(jnp.sum(sizes > 0) - 1, 0)]
    group = jnp.where(has_rows[tile], busy[jnp.clip(rank[first[tile]] + offset, 0,
                                                    num_groups - 1)], last_busy)
    valid = item < item_end[-1]
    flags = ((valid & (offset == 0)) * FIRST + valid * VALID
             + (valid & has_rows[tile]) * HAS_GROUP)
    return GroupMetadata(tile.astype(jnp.int32), group.astype(jnp.int32),
                         flags.astype(jnp.int32), starts, ends)


def _row_masks(rows: jax.Array, group: jax.Array, flags: jax.Array, starts, ends, total):
    """(rows of the item's group, rows this item writes): its group's rows and, for the
    first item of a tile, the rows past every group (zeros)."""
    mine = (rows >= starts[group]) & (rows < ends[group]) & ((flags & HAS_GROUP) != 0)
    writes = mine | (((flags & FIRST) != 0) & (rows >= total))
    return mine, writes


# ------------------------------------------------------------------ tilings

def _largest_dividing(dim: int, candidates) -> int | None:
    return next((c for c in candidates if dim % c == 0), None)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def default_tiling(backend: str, m: int, k: int, n: int, dtype) -> Tiling:
    """TPU: tiles of whole (8|16, 128) vregs, K and N blocks of 128-512 where they divide
    the dimension, else the whole dimension (always a legal block). GPU: powers of two of
    at least 16 (Triton's dot), rows fitted to small M."""
    if backend == TPU:
        sublanes = 8 * 4 // jnp.dtype(dtype).itemsize  # a vreg's rows: 8 float32, 16 bf16
        tm = min(128, _round_up(max(m, 1), sublanes))
        return Tiling(tm, _largest_dividing(k, (512, 256, 128)) or k,
                      _largest_dividing(n, (512, 256, 128)) or n)
    tm = min(64, max(16, pl.next_power_of_2(max(m, 1))))
    return Tiling(tm, _largest_dividing(k, (64, 32, 16)) or 16,
                  _largest_dividing(n, (64, 32, 16)) or 16)


# ------------------------------------------------------------------ the weights

@dataclasses.dataclass(frozen=True)
class QuantizedExperts:
    """How gmm_quantized's weights are stored (kernels/pallas_quantized_matmul.py's layout
    per expert: values [E, K or K / 2, N], scales and offsets [E, groups, N])."""

    bits: int
    group_size: int
    zero_point: int = 0
    has_offsets: bool = False


def _dense_tile(x_ref, w_refs, *, precision):
    """TPU: the K step's product of a dense weight block, float32."""
    return jnp.dot(x_ref[...], w_refs[0][...].astype(x_ref.dtype),
                   preferred_element_type=jnp.float32, precision=precision)


def _quantized_tile(x_ref, w_refs, *, kk, tk, quant: QuantizedExperts, segments, precision):
    """TPU: the K step's product of a quantized weight block, dequantized segment by
    segment (pallas_quantized_matmul.segment_product), float32."""
    v_ref, s_ref = w_refs[0], w_refs[1]
    o_ref = w_refs[2] if quant.has_offsets else None
    acc = None
    for seg in segments:
        row = pl.ds(jax.lax.div(kk * tk + seg.x_at, quant.group_size), 1)
        part = qmm.segment_product(
            x_ref[:, seg.x_at:seg.x_at + seg.size], v_ref[seg.row_at:seg.row_at + seg.size, :],
            s_ref[row, :], None if o_ref is None else o_ref[row, :], high=seg.high,
            bits=quant.bits, zero_point=quant.zero_point, precision=precision)
        acc = part if acc is None else acc + part
    return acc


# ------------------------------------------------------------------ TPU (Mosaic)

def _tpu_kernel(tile_ref, group_ref, flags_ref, starts_ref, ends_ref,  # scalar prefetch
                lhs_ref, *refs, tm: int, num_weights: int, product):
    w_refs, (out_ref, acc_ref) = refs[:num_weights], refs[num_weights:]
    i, k = pl.program_id(1), pl.program_id(2)
    flags, group = flags_ref[i], group_ref[i]

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((flags & HAS_GROUP) != 0)
    def _():
        acc_ref[...] += product(lhs_ref, w_refs, kk=k)

    @pl.when(((flags & VALID) != 0) & (k == pl.num_programs(2) - 1))
    def _():
        rows = tile_ref[i] * tm + jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        total = ends_ref[ends_ref.shape[0] - 1]
        mine, writes = _row_masks(rows, group, flags, starts_ref, ends_ref, total)
        new = jnp.where(mine, acc_ref[...], 0.0).astype(out_ref.dtype)
        # A first item's block holds nothing yet (never read back from HBM).
        kept = jnp.where((flags & FIRST) != 0, jnp.zeros_like(new), out_ref[...])
        out_ref[...] = jnp.where(writes, new, kept)


def _gmm_tpu(lhs, weights, n, meta: GroupMetadata, tiling: Tiling, out_dtype,
             interpret: bool, quant: QuantizedExperts | None):
    m, k = lhs.shape
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    num_items = meta.item_tile.shape[0]
    grid = (n // tn, num_items, k // tk)
    lhs_map = lambda j, i, kk, tile, group, *_: (tile[i], kk)  # noqa: E731
    block_map = lambda j, i, kk, tile, group, *_: (group[i], kk, j)  # noqa: E731
    strip_map = lambda j, i, kk, tile, group, *_: (group[i], 0, j)  # noqa: E731
    out_map = lambda j, i, kk, tile, group, *_: (tile[i], j)  # noqa: E731
    precision = kernel_backend.product_precision(lhs.dtype)
    if quant is None:
        w_specs = [pl.BlockSpec((pl.squeezed, tk, tn), block_map)]
        product = lambda x_ref, w_refs, kk: _dense_tile(x_ref, w_refs,  # noqa: E731
                                                        precision=precision)
    else:
        rows = tk // 2 if quant.bits == 4 else tk
        groups = weights[1].shape[1]
        w_specs = [pl.BlockSpec((pl.squeezed, rows, tn), block_map)] + [
            pl.BlockSpec((pl.squeezed, groups, tn), strip_map)] * (len(weights) - 1)
        product = functools.partial(
            _quantized_tile, tk=tk, quant=quant, precision=precision,
            segments=qmm.step_segments(tk, quant.group_size, quant.bits, qmm.int4_half(k)))
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5, grid=grid,
        in_specs=[pl.BlockSpec((tm, tk), lhs_map)] + w_specs,
        out_specs=pl.BlockSpec((tm, tn), out_map),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)])
    kernel = functools.partial(_tpu_kernel, tm=tm, num_weights=len(weights), product=product)
    return pl.pallas_call(
        kernel, grid_spec=spec, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="gmm_tpu" if quant is None else "gmm_quantized_tpu",
    )(meta.item_tile, meta.item_group, meta.item_flags, meta.group_starts, meta.group_ends,
      lhs, *weights)


# ------------------------------------------------------------------ GPU (Triton)

def _dense_step(lhs_ref, w_refs, kk, group, rows, cols, *, tk, precision):
    """GPU: K step kk's product of a dense weight, float32."""
    x = lhs_ref[rows, pl.ds(kk * tk, tk)]
    w = w_refs[0][group, pl.ds(kk * tk, tk), cols].astype(x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision)


def _quantized_step(lhs_ref, w_refs, kk, group, rows, cols, *, tk, quant: QuantizedExperts,
                    segments, precision):
    """GPU: K step kk's product of a quantized weight, segment by segment, float32."""
    v_ref, s_ref = w_refs[0], w_refs[1]
    o_ref = w_refs[2] if quant.has_offsets else None
    rows_per_step = tk // 2 if quant.bits == 4 else tk
    acc = None
    for seg in segments:
        g = pl.ds(jax.lax.div(kk * tk + seg.x_at, quant.group_size), 1)
        part = qmm.segment_product(
            lhs_ref[rows, pl.ds(kk * tk + seg.x_at, seg.size)],
            v_ref[group, pl.ds(kk * rows_per_step + seg.row_at, seg.size), cols],
            s_ref[group, g, cols], None if o_ref is None else o_ref[group, g, cols],
            high=seg.high, bits=quant.bits, zero_point=quant.zero_point, precision=precision)
        acc = part if acc is None else acc + part
    return acc


def _gpu_kernel(tile_ref, group_ref, flags_ref, starts_ref, ends_ref, lhs_ref, *refs,
                tm: int, tn: int, k_tiles: int, product):
    w_refs, out_ref = refs[:-1], refs[-1]
    j, i = pl.program_id(0), pl.program_id(1)
    flags, group, tile = flags_ref[i], group_ref[i], tile_ref[i]
    rows = pl.ds(tile * tm, tm)
    cols = pl.ds(j * tn, tn)

    valid, has_group = (flags & VALID) != 0, (flags & HAS_GROUP) != 0

    def store(acc):
        row_ids = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
        total = ends_ref[ends_ref.shape[0] - 1]
        mine, writes = _row_masks(row_ids, group, flags, starts_ref, ends_ref, total)
        pltriton.store(out_ref.at[rows, cols],
                       jnp.where(mine, acc, 0.0).astype(out_ref.dtype), mask=writes)

    # The K loop has static bounds: a loop to a traced trip count (0 for an item with no
    # group) lowered, under JAX 0.11's Pallas, to an scf.for whose bounds' types differ,
    # which Triton refused on the H200. An item with no group only writes its zeros.
    @pl.when(valid & has_group)
    def _():
        def step(kk, acc):
            return acc + product(lhs_ref, w_refs, kk, group, rows, cols)

        store(jax.lax.fori_loop(0, k_tiles, step, jnp.zeros((tm, tn), jnp.float32)))

    @pl.when(valid & ~has_group)
    def _():
        store(jnp.zeros((tm, tn), jnp.float32))


def _gmm_gpu(lhs, weights, n, meta: GroupMetadata, tiling: Tiling, out_dtype,
             interpret: bool, quant: QuantizedExperts | None):
    m, k = lhs.shape
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    num_items = meta.item_tile.shape[0]
    precision = kernel_backend.product_precision(lhs.dtype)
    if quant is None:
        product = functools.partial(_dense_step, tk=tk, precision=precision)
    else:
        product = functools.partial(
            _quantized_step, tk=tk, quant=quant, precision=precision,
            segments=qmm.step_segments(tk, quant.group_size, quant.bits, qmm.int4_half(k)))
    kernel = functools.partial(_gpu_kernel, tm=tm, tn=tn, k_tiles=k // tk, product=product)
    return pl.pallas_call(
        kernel, grid=(n // tn, num_items), out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="gmm_gpu" if quant is None else "gmm_quantized_gpu",
    )(meta.item_tile, meta.item_group, meta.item_flags, meta.group_starts, meta.group_ends,
      lhs, *weights)


# ------------------------------------------------------------------ the entry point

def _pad_to(a: jax.Array, axis: int, size: int) -> jax.Array:
    if a.shape[axis] == size:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, widths)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, backend: str = TPU,
        interpret: bool = False, tiling: Tiling | None = None, out_dtype=None) -> jax.Array:
    """lhs [M, K] (rows sorted by group) times rhs [E, K, N] per group -> [M, N] in
    `out_dtype` (default lhs's), accumulated in float32 (module docstring).

    lhs's rows are padded to whole row tiles (a copy of the activations). The weights are
    never copied on the TPU (a dimension no block size divides is one block); on the GPU a
    K or N that is not a multiple of 16 is padded (a copy of every weight per call: model
    dimensions are multiples of 16)."""
    if backend not in BACKENDS:
        raise ValueError(f"gmm backend {backend!r}: expected one of {BACKENDS}")
    m, k = lhs.shape
    num_groups, k2, n = rhs.shape
    if k2 != k or group_sizes.shape != (num_groups,):
        raise ValueError(f"gmm: lhs {lhs.shape}, rhs {rhs.shape} and group_sizes "
                         f"{group_sizes.shape} do not agree")
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    tiling = tiling or default_tiling(backend, m, k, n, lhs.dtype)
    kp, np_ = k, n
    if backend == GPU:
        kp, np_ = _round_up(k, tiling.tk), _round_up(n, tiling.tn)
        lhs, rhs = _pad_to(lhs, 1, kp), _pad_to(_pad_to(rhs, 1, kp), 2, np_)
    if kp % tiling.tk or np_ % tiling.tn:
        raise ValueError(f"gmm: tiling {tiling} does not divide K = {k}, N = {n}")
    return _run(lhs, [rhs], np_, group_sizes, backend, tiling, out_dtype, interpret,
                None)[:m, :n]


def _run(lhs, weights, n, group_sizes, backend, tiling, out_dtype, interpret, quant):
    m = lhs.shape[0]
    mp = _round_up(max(m, 1), tiling.tm)
    lhs = _pad_to(lhs, 0, mp)
    meta = group_metadata(group_sizes, mp // tiling.tm, tiling.tm)
    run = _gmm_tpu if backend == TPU else _gmm_gpu
    return run(lhs, weights, n, meta, tiling, out_dtype, interpret, quant)[:m]


def gmm_quantized(lhs: jax.Array, values: jax.Array, scales: jax.Array,
                  offsets: jax.Array | None, group_sizes: jax.Array, *, bits: int,
                  group_size: int, zero_point: int = 0, backend: str = TPU,
                  interpret: bool = False, tiling: Tiling | None = None,
                  out_dtype=None) -> jax.Array:
    """gmm over quantized experts, each dequantized tile by tile inside the kernel (its
    packed bytes read once): values [E, K or K / 2, N], scales / offsets [E, groups, N] in
    kernels/pallas_quantized_matmul.py's layout (`accelerator_layout` per expert: the
    MoE experts are stored so at load, quantization/experts.stored_for_step)."""
    if backend not in BACKENDS:
        raise ValueError(f"gmm backend {backend!r}: expected one of {BACKENDS}")
    m, k = lhs.shape
    num_groups, _, n = values.shape
    if group_sizes.shape != (num_groups,):
        raise ValueError(f"gmm_quantized: group_sizes {group_sizes.shape} for {num_groups} "
                         "experts")
    tiling = tiling or qmm.default_tiling(backend, m, k, n, bits=bits, group_size=group_size,
                                          dtype=lhs.dtype)
    shape = lambda a: None if a is None else jax.ShapeDtypeStruct(a.shape[1:], a.dtype)  # noqa: E731
    qmm.check_layout(k, n, shape(values), shape(scales), shape(offsets), bits, group_size,
                     tiling, backend)
    quant = QuantizedExperts(bits, group_size, zero_point, offsets is not None)
    weights = [values, scales] + ([] if offsets is None else [offsets])
    return _run(lhs, weights, n, group_sizes, backend, tiling,
                jnp.dtype(out_dtype or lhs.dtype), interpret, quant)
