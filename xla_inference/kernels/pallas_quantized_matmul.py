"""x times a quantized weight in Pallas, dequantizing tile by tile inside the kernel (the
packed weight is read once from HBM, nothing dequantized is written back), accumulated in
float32: a TPU kernel (Mosaic) and a GPU kernel (Triton lowering), both runnable in Pallas
interpret mode on any device.

    quantized_matmul(x [M, K], values, scales, offsets, *, bits, group_size) -> [M, N]
    w[k, n] = (q[k, n] - zero_point) * scales[k // group_size, n] + offsets[k // group_size, n]

The accelerator layout (K-major: a row of values is one input's N outputs, what x @ w
reads in blocks of [K tile, N tile]):
- 8-bit integers: values int8 [K, N]; FP8: float8_e4m3fn [K, N] (bits = 8, told apart by
  the dtype);
- 4-bit integers: values uint8 [K / 2, N], two inputs a byte, split by blocks of 2H inputs
  (H = int4_half(K): 128, or K / 2 for a K that 256 does not divide): byte row b * H + i
  holds input b * 2H + i in its low nibble and input b * 2H + H + i in its high nibble. A
  block of H bytes then pairs with two contiguous, lane-aligned halves of x's block: no
  shuffle of x or of the nibbles, and a split of K over devices in multiples of 2H keeps
  whole bytes on each;
- scales and offsets: [groups, N] (float16 or float32; converted in the kernel); offsets
  may be None.

quantization/packed.PackedWeight keeps the native CPU kernel's layout ([out, in] in tiles
of 16 output rows, 32-byte chunks interleaving 16 rows): its minor dimension of 32 bytes
would fill a quarter of a TPU vreg's 128 lanes and needs a lane shuffle per tile, so the
accelerators take the layout above: quantization/packed.pack stores a projection in it at
load (layout K_MAJOR) when this kernel will serve it (`quantized_matmul_route`);
`accelerator_layout` converts PackedWeight's tiled arrays (a rewrite of every byte): the
MoE experts are converted with it at load when the Pallas grouped matmul will serve them
(quantization/experts.stored_for_step), never in a step.

Each K step of the kernels is cut into segments of inputs that share one group (and, for
4 bits, one nibble): segment product x_s @ (q_s - z) in x's dtype (the integers are exact
in bfloat16), then, in float32, times the group's scale row, plus the sum of x_s times the
group's offset row (x @ (q s + o) = (x @ q) s + (sum x) o per group). Scales are applied to
float32 partial sums, never rounded into bfloat16 weights.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from xla_inference import envs
from xla_inference.kernels import backend as kernel_backend

TPU, GPU = "tpu", "gpu"
INT4_HALF = 128  # H: inputs per nibble half of a 4-bit block (module docstring)
TILE_ROWS = 16  # PackedWeight's output rows per tile (quantization/packed.TILE_ROWS)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """tm rows of x, tk inputs per K step, tn output columns."""

    tm: int
    tk: int
    tn: int


def int4_half(in_features: int) -> int:
    """H of the 4-bit layout for K inputs: 128 where 256 divides K, else K / 2."""
    return INT4_HALF if in_features % (2 * INT4_HALF) == 0 else in_features // 2


# ------------------------------------------------------------------ backend choice

# Quantized projections follow the process's kernel choice as the MoE GMM does
# (kernels/backend.pallas_route); XLA_INFERENCE_QMM_BACKEND overrides it for them alone.
# The choice is made at load (quantization/packed.pack stores the weights in this module's
# layout for a Pallas backend) and read again when a product is traced.
QMM_BACKEND_VARIABLE = "XLA_INFERENCE_QMM_BACKEND"


def quantized_matmul_route() -> kernel_backend.PallasRoute | None:
    """Which Pallas quantized matmul serves quantized projections, or None (the CPU's
    native kernel, or XLA's product on the dequantized weight)."""
    return kernel_backend.pallas_route(envs.qmm_backend(), QMM_BACKEND_VARIABLE)


def _is_fp8(values) -> bool:
    return jnp.dtype(values.dtype) == jnp.dtype(jnp.float8_e4m3fn)


# ------------------------------------------------------------------ layout conversion

def _untiled_values(values: jax.Array, bits: int, in_features: int) -> jax.Array:
    """PackedWeight's tiled integers [out/16, chunks, 32] -> [out_padded, in] (int8, or
    uint8 0..15 for 4 bits): chunk c, byte 2r + j holds q[r, 2c + j] (8-bit) or
    q[r, 4c + j] | q[r, 4c + 2 + j] << 4 (4-bit)."""
    tiles, chunks = values.shape[:2]
    pairs = values.reshape(tiles, chunks, TILE_ROWS, 2)  # byte (r, j) of chunk c
    if bits == 8:
        q = pairs.transpose(0, 2, 1, 3)  # [T, r, c, j]
    else:
        stack = np.stack if isinstance(values, np.ndarray) else jnp.stack  # host or device
        q = stack([pairs & 15, pairs >> 4], axis=3).transpose(0, 2, 1, 3, 4)
    return q.reshape(tiles * TILE_ROWS, in_features)


def _untiled_groups(a: jax.Array) -> jax.Array:
    """PackedWeight's tiled scales or offsets [out/16, groups, 16] -> [out_padded, groups]."""
    return a.transpose(0, 2, 1).reshape(-1, a.shape[1])


def pack_int4(q: jax.Array) -> jax.Array:
    """4-bit integers [K, N] (0..15, any integer dtype) -> the uint8 [K / 2, N] layout."""
    k, n = q.shape
    half = int4_half(k)
    blocks = q.astype(jnp.uint8).reshape(k // (2 * half), 2, half, n)
    return (blocks[:, 0] | (blocks[:, 1] << 4)).reshape(k // 2, n)


def unpack_int4(values: jax.Array) -> jax.Array:
    """The uint8 [K / 2, N] layout -> 4-bit integers [K, N] (uint8 0..15): pack_int4 undone,
    for products that dequantize in XLA rather than in the kernel."""
    k = 2 * values.shape[0]
    half = int4_half(k)
    blocks = values.reshape(k // (2 * half), half, -1)
    return jnp.stack([blocks & 15, blocks >> 4], axis=1).reshape(k, -1)


def accelerator_layout(values, scales, offsets, *, bits: int, in_features: int,
                       out_features: int):
    """PackedWeight's raw arrays (tiled integers, or FP8's plain [out, in]) -> (values,
    scales, offsets) in this module's layout. Rewrites every byte: for load time (numpy
    arrays in, numpy arrays out: quantization/experts.to_kernel_layout stores MoE experts
    so; jax arrays give jax arrays)."""
    if _is_fp8(values):
        pick = lambda a: None if a is None else a.T  # noqa: E731  [out, groups] -> [groups, out]
        return values.T, scales.T, pick(offsets)
    q = _untiled_values(values, bits, in_features)[:out_features].T  # [K, N]
    groups = lambda a: (None if a is None  # noqa: E731
                        else _untiled_groups(a)[:out_features].T)
    return (q if bits == 8 else pack_int4(q)), groups(scales), groups(offsets)


# ------------------------------------------------------------------ the segments

@dataclasses.dataclass(frozen=True)
class Segment:
    """Inputs [x_at, x_at + size) of a K step's x block, all in one group, whose integers
    are rows [row_at, row_at + size) of the step's values block (nibble `high` for 4 bits)."""

    x_at: int
    row_at: int
    size: int
    high: bool


def step_segments(tk: int, group_size: int, bits: int, half: int) -> list[Segment]:
    """A K step of tk inputs (aligned to tk) as segments of one group each."""
    if bits == 4:
        size = min(group_size, half)
        return [Segment(b * 2 * half + c * half + s, b * half + s, size, bool(c))
                for b in range(tk // (2 * half)) for c in (0, 1)
                for s in range(0, half, size)]
    size = min(group_size, tk)
    return [Segment(s, s, size, False) for s in range(0, tk, size)]


def segment_product(x, v, scale, offset, *, high: bool, bits: int, zero_point: int,
                     precision):
    """x [tm, s] times one group's integers v [s, tn] (stored form), scaled: float32."""
    if bits == 4:
        v = v.astype(jnp.int32)
        v = (v >> 4) if high else (v & 15)
    q = v.astype(jnp.float32)
    if zero_point:
        q = q - zero_point  # exact: small integers
    y = jnp.dot(x, q.astype(x.dtype), preferred_element_type=jnp.float32,
                precision=precision) * scale.astype(jnp.float32)
    if offset is not None:
        y = y + jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True) * offset.astype(
            jnp.float32)
    return y


# ------------------------------------------------------------------ TPU (Mosaic)

def _tpu_kernel(x_ref, v_ref, s_ref, *rest, segments, tk, group_size, bits, zero_point,
                has_offsets, precision):
    o_ref = rest[0] if has_offsets else None
    out_ref, acc_ref = rest[-2], rest[-1]
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc = acc_ref[...]
    for seg in segments:
        group = jax.lax.div(kk * tk + seg.x_at, group_size)  # non-negative: no floor fix-up
        row = pl.ds(group, 1)
        acc += segment_product(
            x_ref[:, seg.x_at:seg.x_at + seg.size], v_ref[seg.row_at:seg.row_at + seg.size, :],
            s_ref[row, :], None if o_ref is None else o_ref[row, :], high=seg.high, bits=bits,
            zero_point=zero_point, precision=precision)
    acc_ref[...] = acc

    @pl.when(kk == pl.num_programs(2) - 1)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _run_tpu(x, values, scales, offsets, tiling, *, bits, group_size, zero_point, out_dtype,
             interpret):
    m, k = x.shape
    n = values.shape[1]
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    rows_per_step = tk // 2 if bits == 4 else tk
    groups = scales.shape[0]
    strip = pl.BlockSpec((groups, tn), lambda i, j, kk: (0, j))  # a column strip: once per j
    in_specs = [pl.BlockSpec((tm, tk), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((rows_per_step, tn), lambda i, j, kk: (kk, j)), strip]
    operands = [x, values, scales]
    if offsets is not None:
        in_specs.append(strip)
        operands.append(offsets)
    kernel = functools.partial(
        _tpu_kernel, segments=step_segments(tk, group_size, bits, int4_half(k)), tk=tk,
        group_size=group_size, bits=bits, zero_point=zero_point,
        has_offsets=offsets is not None, precision=kernel_backend.product_precision(x.dtype))
    return pl.pallas_call(
        kernel, grid=(m // tm, n // tn, k // tk), in_specs=in_specs,
        out_specs=pl.BlockSpec((tm, tn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="quantized_matmul_tpu",
    )(*operands)


# ------------------------------------------------------------------ GPU (Triton)

def _gpu_kernel(x_ref, v_ref, s_ref, *rest, segments, tm, tk, tn, k_steps, group_size, bits,
                zero_point, has_offsets, precision):
    o_ref = rest[0] if has_offsets else None
    out_ref = rest[-1]
    i, j = pl.program_id(0), pl.program_id(1)
    rows, cols = pl.ds(i * tm, tm), pl.ds(j * tn, tn)
    rows_per_step = tk // 2 if bits == 4 else tk

    def step(kk, acc):
        for seg in segments:
            group = jax.lax.div(kk * tk + seg.x_at, group_size)  # non-negative: no floor fix-up
            scale = s_ref[pl.ds(group, 1), cols]
            offset = None if o_ref is None else o_ref[pl.ds(group, 1), cols]
            acc += segment_product(
                x_ref[rows, pl.ds(kk * tk + seg.x_at, seg.size)],
                v_ref[pl.ds(kk * rows_per_step + seg.row_at, seg.size), cols], scale, offset,
                high=seg.high, bits=bits, zero_point=zero_point, precision=precision)
        return acc

    acc = jax.lax.fori_loop(0, k_steps, step, jnp.zeros((tm, tn), jnp.float32))
    out_ref[rows, cols] = acc.astype(out_ref.dtype)


def _run_gpu(x, values, scales, offsets, tiling, *, bits, group_size, zero_point, out_dtype,
             interpret):
    m, k = x.shape
    n = values.shape[1]
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    operands = [x, values, scales] + ([] if offsets is None else [offsets])
    kernel = functools.partial(
        _gpu_kernel, segments=step_segments(tk, group_size, bits, int4_half(k)), tm=tm, tk=tk,
        tn=tn, k_steps=k // tk, group_size=group_size, bits=bits, zero_point=zero_point,
        has_offsets=offsets is not None, precision=kernel_backend.product_precision(x.dtype))
    return pl.pallas_call(
        kernel, grid=(m // tm, n // tn), out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="quantized_matmul_gpu",
    )(*operands)


# ------------------------------------------------------------------ tilings

def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def k_step(k: int, group_size: int, bits: int, candidates) -> int:
    """The largest candidate K step that divides K, holds whole groups or lies in one,
    and (4 bits) holds whole 2H blocks; else all of K."""
    half = int4_half(k)
    for tk in candidates:
        fits = k % tk == 0 and (tk % group_size == 0 or group_size % tk == 0)
        if fits and (bits != 4 or tk % (2 * half) == 0):
            return tk
    return k


def default_tiling(backend: str, m: int, k: int, n: int, *, bits: int, group_size: int,
                   dtype) -> Tiling:
    if backend == TPU:
        sublanes = 8 * 4 // jnp.dtype(dtype).itemsize
        tn = next((c for c in (512, 256, 128) if n % c == 0), n)
        return Tiling(min(128, _round_up(max(m, 1), sublanes)),
                      k_step(k, group_size, bits, (512, 256)), tn)
    tn = next((c for c in (64, 32, 16) if n % c == 0), n)
    tm = min(32, max(16, pl.next_power_of_2(max(m, 1))))
    return Tiling(tm, k_step(k, group_size, bits, (256, 128, 64, 32, 16)), tn)


def layout_supported(k: int, n: int, *, bits: int, group_size: int, backend: str) -> bool:
    """Whether the kernels take a [K, N] weight of this kind with their default tiling
    (4 bits: groups must nest with the 2H blocks; GPU: Triton's dot needs >= 16)."""
    half = int4_half(k)
    if k % group_size or (bits == 4 and (k % 2 or k % (2 * half)
                                         or (half % group_size and group_size % half))):
        return False
    tiling = default_tiling(backend, 1, k, n, bits=bits, group_size=group_size,
                            dtype=jnp.float32)
    segment = min(group_size, half if bits == 4 else tiling.tk)
    power = lambda d: d >= 16 and d == pl.next_power_of_2(d)  # noqa: E731  Triton's blocks
    return backend == TPU or (power(segment) and power(tiling.tk) and power(tiling.tn))


def check_layout(k, n, values, scales, offsets, bits, group_size, tiling, backend):
    rows = k // 2 if bits == 4 else k
    if values.shape != (rows, n) or scales.shape != (k // group_size, n) or k % group_size:
        raise ValueError(f"quantized_matmul: values {values.shape}, scales {scales.shape} "
                         f"do not fit K = {k} in groups of {group_size} ({bits} bits)")
    if offsets is not None and offsets.shape != scales.shape:
        raise ValueError(f"quantized_matmul: offsets {offsets.shape} != scales {scales.shape}")
    half = int4_half(k)
    if bits == 4 and (k % (2 * half) or tiling.tk % (2 * half)
                      or (half % group_size and group_size % half)):
        raise ValueError(f"quantized_matmul: 4-bit K = {k}, K step {tiling.tk}, groups of "
                         f"{group_size}: not whole blocks of {2 * half} inputs")
    if k % tiling.tk or n % tiling.tn or (tiling.tk % group_size and group_size % tiling.tk):
        raise ValueError(f"quantized_matmul: tiling {tiling} does not fit K = {k}, N = {n}, "
                         f"groups of {group_size}")
    if backend == GPU and (group_size < 16 or min(tiling.tn, tiling.tm) < 16):
        raise ValueError("quantized_matmul: Triton's dot needs segments and tiles of >= 16")


# ------------------------------------------------------------------ the entry point

def quantized_matmul(x: jax.Array, values: jax.Array, scales: jax.Array,
                     offsets: jax.Array | None, *, bits: int, group_size: int,
                     zero_point: int = 0, backend: str = TPU, interpret: bool = False,
                     tiling: Tiling | None = None, out_dtype=None) -> jax.Array:
    """x [M, K] times the weight (module docstring's layout) -> [M, N] in `out_dtype`
    (default x's), accumulated in float32. x's rows are padded to whole row tiles."""
    if backend not in (TPU, GPU):
        raise ValueError(f"quantized_matmul backend {backend!r}: expected tpu or gpu")
    if bits not in (4, 8) or (_is_fp8(values) and bits != 8):
        raise ValueError(f"quantized_matmul: {bits} bits of {values.dtype}")
    m, k = x.shape
    n = values.shape[1]
    tiling = tiling or default_tiling(backend, m, k, n, bits=bits, group_size=group_size,
                                      dtype=x.dtype)
    check_layout(k, n, values, scales, offsets, bits, group_size, tiling, backend)
    mp = _round_up(max(m, 1), tiling.tm)
    xp = x if mp == m else jnp.pad(x, ((0, mp - m), (0, 0)))
    run = _run_tpu if backend == TPU else _run_gpu
    y = run(xp, values, scales, offsets, tiling, bits=bits, group_size=group_size,
            zero_point=zero_point, out_dtype=jnp.dtype(out_dtype or x.dtype),
            interpret=interpret)
    return y[:m]


def dequantized_reference(values, scales, offsets, *, bits: int, group_size: int,
                          zero_point: int = 0) -> np.ndarray:
    """The layout's [K, N] weight in float64 (numpy): for tests and checks."""
    v = np.asarray(values)
    if bits == 4:
        k = 2 * v.shape[0]
        half = int4_half(k)
        blocks = v.reshape(k // (2 * half), half, -1)
        v = np.stack([blocks & 15, blocks >> 4], axis=1).reshape(k, -1)
    q = v.astype(np.float64) - zero_point
    rep = lambda a: np.repeat(np.asarray(a, np.float64), group_size, axis=0)  # noqa: E731
    w = q * rep(scales)
    return w if offsets is None else w + rep(offsets)
