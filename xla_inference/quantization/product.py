"""x times a quantized weight: the one product every family's projections use when the
weights are quantized (layers/linear.project hands PackedWeights here).

Two ways, chosen per trace by the number of rows (a static shape):
- up to KERNEL_MAX_ROWS rows on the host CPU (decode, small batches: memory-bound), the
  native kernel (kernels/cpu_quantized.py) reads the packed bytes once and multiplies in
  integers: the activations are quantized per row, to int8 where the scheme says so
  (compressed-tensors' dynamic W8A8) and otherwise to 15-bit integers (finer than
  bfloat16's 8-bit mantissa, so weight-only formats keep their float-activation accuracy);
- from wide_kernel_min_rows() rows on (prefill, larger batches), on a host CPU with AMX
  (from WIDE_KERNEL_MIN_ROWS) or AVX-512 bfloat16 dot products (past KERNEL_MAX_ROWS), the
  kernel's wide entry dequantizes each tile of weight rows once per step into bfloat16 in a
  cache-resident scratch and multiplies every row by it in AMX bfloat16 tiles (or
  vdpbf16ps): the numbers of XLA's bfloat16 product on the dequantized weight, 3-10x
  faster than it with AMX, 1-2.5x with AVX-512 (a Zen 4); against XLA's bfloat16 product
  on a dense weight about even (AVX-512: 0.8-1.3x from 64 rows), with AMX slower at 16-64
  rows, where dequantizing each weight costs about what reading it in bfloat16 does
  (benchmarks/quantized_wide_shapes.py); W8A8 in int8 (vpdpbusd) where the AVX-512 path
  runs on a CPU with VNNI. Only where the weight's compute dtype is
  bfloat16 (a float32 policy keeps XLA's float32 product) or the scheme's activations are
  int8 (whose integers and per-channel scales the entry multiplies exactly);
- on a TPU or GPU (kernels/pallas_quantized_matmul.quantized_matmul_route), for a weight
  stored at load in that kernel's K-major layout (packed.K_MAJOR: pack decided it where the
  kernel takes the weight's shape and groups), the Pallas quantized matmul: the stored
  arrays go into the kernel as they are (no relayout in the step), which reads each weight
  byte once and dequantizes tile by tile; int8 activations are fake-quantized first, as
  for XLA's product below. A Pallas call has no partitioning rule (GSPMD would gather the
  weight whole on every device, each step), so under tensor parallel the product is split
  by hand (shard_map) as the weight is placed (PackedWeight.tensor_split): each device
  multiplies its share, outputs split (column parallel) or inputs split and the partial
  products summed (row parallel); where the kernel cannot take a share alone (a 4-bit
  split that cuts its 2H-input blocks, a group across devices) every device multiplies
  the whole weight, gathered, as GSPMD would;
- otherwise (neither, other devices) XLA dequantizes the weight into its compute dtype and
  runs its dense product; on GPUs and TPUs XLA fuses the dequantization into the product.
  Int8 activations are then fake-quantized the same way, and the int8 integer product runs
  as an int32-accumulating dot.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from xla_inference.kernels import cpu_dense, cpu_quantized
from xla_inference.kernels import pallas_quantized_matmul as qmm
from xla_inference.parallel.sharding import TENSOR_AXIS, tensor_parallel_mesh
from xla_inference.quantization.groups import INT4, INT8, INT8_ACTIVATIONS
from xla_inference.quantization.packed import (PackedWeight, dequantize, untiled_groups,
                                                untiled_values)

# Rows up to which the native kernel runs on the CPU; beyond, the dense product on the
# dequantized weight is faster (benchmarks/RESULTS.md, issue 18).
KERNEL_MAX_ROWS = 32
# Rows from which the wide entry (AMX) beats the narrow kernel, whose time grows with the
# rows (benchmarks/quantized_matmul.py --wide, [1536, 576] int4: 0.26 against 0.21 ms at 16
# rows, 0.50 against 0.26 at 32; 0.13 against 0.25 at 8).
WIDE_KERNEL_MIN_ROWS = 16
# 15-bit activations: |x| * 16383 times a |q| <= 128 stays far inside int32 over a group.
FLOAT_ACTIVATION_LEVELS = 16383.0
INT8_LEVELS = 127.0


def quantize_rows(x: jax.Array, levels: float) -> tuple[jax.Array, jax.Array]:
    """x [R, in] float -> (integers [R, in] int16 with |q| <= levels, scale [R] float32):
    x ~ q * scale, symmetric per row (vLLM's dynamic per-token quantization for int8)."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / levels
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x / scale[:, None]), -levels, levels)
    return q.astype(jnp.int16), scale


def uses_kernel(w, rows: int) -> bool:
    """Whether `rows` rows times w (a PackedWeight, or one of quantization/experts.py's
    experts) run the native CPU kernel."""
    return (w.tiled and rows <= KERNEL_MAX_ROWS and jax.default_backend() == "cpu"
            and cpu_quantized.available())


def wide_kernel_min_rows() -> int | None:
    """The fewest rows that take the kernel's wide entry on this CPU, or None where it is not
    taken: WIDE_KERNEL_MIN_ROWS with AMX; past the narrow kernel's rows with AVX-512 bfloat16
    only (vdpbf16ps on the dequantized tiles: about even with the narrow kernel at 16-32 rows,
    1-2.5x XLA's dequantize-then-multiply from 64 rows on, benchmarks/RESULTS.md); never on
    the portable path (slower than XLA's product). Needs cpu_quantized.available()."""
    isa = cpu_quantized.wide_isa()
    if isa == "amx":
        return WIDE_KERNEL_MIN_ROWS
    if isa == "avx512_bf16":
        return KERNEL_MAX_ROWS + 1
    return None


def uses_wide_kernel(w, rows: int) -> bool:
    """Whether `rows` rows (wide_kernel_min_rows() or more) times w (a PackedWeight) run the
    native kernel's wide entry, in place of the narrow one or XLA's product, for bfloat16
    compute or int8 activations."""
    if not (w.tiled and jax.default_backend() == "cpu"
            and (w.compute_dtype == "bfloat16" or w.activations == INT8_ACTIVATIONS)
            and cpu_quantized.available()):
        return False
    fewest = wide_kernel_min_rows()
    return fewest is not None and rows >= fewest


def _wide_product(x2: jax.Array, w: PackedWeight) -> jax.Array:
    int8 = w.activations == INT8_ACTIVATIONS  # per-channel symmetric int8: pack() checks
    y = cpu_quantized.quantized_matmul_wide(x2, w.values, w.scales, w.offsets,
                                            bits=4 if w.kind != INT8 else 8,
                                            group_size=w.group_size,
                                            zero_point=w.zero_point,
                                            int8_levels=INT8_LEVELS if int8 else 0.0)
    return y[:, :w.out_features]


def _kernel_product(x2: jax.Array, w: PackedWeight) -> jax.Array:
    levels = INT8_LEVELS if w.activations == INT8_ACTIVATIONS else FLOAT_ACTIVATION_LEVELS
    # The kernel quantizes the rows itself, as quantize_rows(x2, levels) would (same bits).
    y = cpu_quantized.quantized_matmul_float(x2, w.values, w.scales, w.offsets,
                                             bits=4 if w.kind != INT8 else 8,
                                             group_size=w.group_size, levels=levels,
                                             zero_point=w.zero_point)
    return y[:, :w.out_features]


def _multi_kernel_key(w: PackedWeight):
    """What weights multiplied in one multi-weight kernel call must share."""
    return (w.kind, w.group_size, w.zero_point, w.activations, w.in_features)


def _kernel_products(x2: jax.Array, ws,
                     around: cpu_quantized.Surroundings = cpu_quantized.Surroundings()
                     ) -> list[jax.Array]:
    """_kernel_product(x2, w) for each of ws (sharing _multi_kernel_key), in one call, with
    what the call does `around` them."""
    w = ws[0]
    levels = INT8_LEVELS if w.activations == INT8_ACTIVATIONS else FLOAT_ACTIVATION_LEVELS
    ys = cpu_quantized.quantized_matmul_multi(
        x2, [(v.values, v.scales, v.offsets) for v in ws], bits=4 if w.kind != INT8 else 8,
        group_size=w.group_size, levels=levels, zero_point=w.zero_point, around=around)
    return [y[:, :v.out_features] for y, v in zip(ys, ws)]


def uses_one_kernel_call(ws, rows: int) -> bool:
    """Whether `rows` rows times each of the PackedWeights ws (one input, one weight or
    more) can run as one native kernel call (cpu_quantized.quantized_matmul_multi): the
    narrow kernel's rows, weights of one format, no Pallas route or wide entry, and no
    tensor-parallel mesh (the call has no partitioning rule of its own)."""
    return (len(ws) > 0 and all(uses_kernel(w, rows) and not uses_wide_kernel(w, rows)
                                and pallas_route(w) is None for w in ws)
            and len({_multi_kernel_key(w) for w in ws}) == 1
            and tensor_parallel_mesh() is None)


def uses_multi_kernel(ws, rows: int) -> bool:
    """Whether several PackedWeights ws run as one native kernel call (uses_one_kernel_call)."""
    return len(ws) > 1 and uses_one_kernel_call(ws, rows)


def _int8_product(x2: jax.Array, w: PackedWeight) -> jax.Array:
    """W8A8 int8 by XLA: int8 activations times int8 weights, summed in int32, then both
    scales (one per row and one per output channel: the scheme's per-channel weights)."""
    xq, x_scale = quantize_rows(x2, INT8_LEVELS)
    q = untiled_values(w)[:w.out_features]
    acc = jnp.einsum("ri,oi->ro", xq.astype(jnp.int8), q, preferred_element_type=jnp.int32)
    w_scale = untiled_groups(w.scales, w)[:w.out_features, 0]  # one scale a channel
    return acc.astype(jnp.float32) * x_scale[:, None] * w_scale[None, :]


def scheme_activations(x2: jax.Array, w) -> jax.Array:
    """x [R, in] as the weight's scheme feeds it to a dequantized product: rounded per row
    to int8 levels for W8A8 int8, unchanged for weight-only formats."""
    if w.activations != INT8_ACTIVATIONS:
        return x2
    xq, x_scale = quantize_rows(x2, INT8_LEVELS)
    return xq.astype(jnp.float32) * x_scale[:, None]


def pallas_route(w: PackedWeight):
    """The Pallas quantized matmul's route (backend, interpret mode) that multiplies w, or
    None: w must be stored in its layout (K_MAJOR, decided at load) and a Pallas backend
    still chosen now (a process that changed the variables since load falls back to XLA's
    product on the dequantized weight, which reads that layout too)."""
    if not w.k_major:
        return None
    route = qmm.quantized_matmul_route()
    if route is None or not qmm.layout_supported(w.in_features, w.out_features, bits=w.bits,
                                                 group_size=w.group_size,
                                                 backend=route.backend):
        return None
    return route


def _pallas_product(x2: jax.Array, w: PackedWeight, route) -> jax.Array:
    return _pallas_kernel(scheme_activations(x2, w), w, route)


def _pallas_kernel(x2: jax.Array, w: PackedWeight, route) -> jax.Array:
    """x2 (int8 activations already fake-quantized) times w by the kernel, float32."""
    x2 = x2.astype(jnp.dtype(w.compute_dtype))
    return qmm.quantized_matmul(x2, w.values, w.scales, w.offsets, bits=w.bits,
                                group_size=w.group_size, zero_point=w.zero_point,
                                backend=route.backend, interpret=route.interpret,
                                out_dtype=jnp.float32)


def _local_share(w: PackedWeight, devices: int) -> PackedWeight | None:
    """The weight one device holds under w.tensor_split over `devices` devices (its static
    sizes; the arrays are w's), or None where the kernel cannot multiply that share alone."""
    if w.tensor_split == 1 and w.out_features % devices == 0:
        return dataclasses.replace(w, out_features=w.out_features // devices)
    k = w.in_features // devices
    if w.tensor_split != 0 or w.in_features % devices or k % w.group_size:
        return None
    if w.kind == INT4 and (k % (2 * qmm.int4_half(w.in_features))
                           or qmm.int4_half(k) != qmm.int4_half(w.in_features)):
        return None  # the split cuts the 2H-input blocks of the 4-bit layout
    return dataclasses.replace(w, in_features=k)


def _pallas_on_mesh(x2: jax.Array, w: PackedWeight, route, mesh) -> jax.Array:
    """The kernel under shard_map over the tensor axis: on each device's share of w where
    the kernel takes that share alone, else on the whole weight on every device (what
    GSPMD would do for a call it cannot partition: gather the weight)."""
    local = _local_share(w, mesh.shape[TENSOR_AXIS]) if w.tensor_split is not None else None
    if local is not None and not qmm.layout_supported(
            local.in_features, local.out_features, bits=w.bits, group_size=w.group_size,
            backend=route.backend):
        local = None
    split, x_spec, out_spec = {
        None: (PartitionSpec(), PartitionSpec(), PartitionSpec()),  # whole on every device
        1: (PartitionSpec(None, TENSOR_AXIS), PartitionSpec(), PartitionSpec(None, TENSOR_AXIS)),
        0: (PartitionSpec(TENSOR_AXIS, None), PartitionSpec(None, TENSOR_AXIS), PartitionSpec()),
    }[None if local is None else w.tensor_split]
    specs = dataclasses.replace(w, values=split, scales=split,
                                offsets=None if w.offsets is None else split)

    def body(x, share):
        if local is not None:
            share = dataclasses.replace(share, in_features=local.in_features,
                                        out_features=local.out_features)
        y = _pallas_kernel(x, share, route)
        return jax.lax.psum(y, TENSOR_AXIS) if x_spec != PartitionSpec() else y

    # Int8 activations are rounded per row over the whole row, before any split. Manual
    # over every axis not yet manual (the data axis is 1 here, or manual already under
    # data parallel replicas): the TPU kernel's interpret mode runs host callbacks, which
    # JAX allows only in wholly manual code.
    axes = set(mesh.axis_names) - set(mesh.manual_axes)
    return jax.shard_map(body, mesh=mesh, in_specs=(x_spec, specs), out_specs=out_spec,
                         axis_names=axes, check_vma=False)(scheme_activations(x2, w), w)


def _pallas_any_mesh(x2: jax.Array, w: PackedWeight, route) -> jax.Array:
    """The Pallas product; where the step is traced over a tensor-parallel mesh, split by
    hand over it (_pallas_on_mesh)."""
    mesh = tensor_parallel_mesh()
    return _pallas_product(x2, w, route) if mesh is None else _pallas_on_mesh(x2, w, route, mesh)


def _dense_product(x2: jax.Array, w: PackedWeight) -> jax.Array:
    x2 = scheme_activations(x2, w)
    weight = dequantize(w)
    return cpu_dense.bfloat16_product(x2.astype(weight.dtype), weight, jnp.float32)


def quantized_project(x: jax.Array, w: PackedWeight, out_dtype=None) -> jax.Array:
    """x [..., in] times w [out, in] -> [..., out] in `out_dtype` (default x's dtype),
    accumulated in float32."""
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    route = pallas_route(w)
    if route is not None:
        y = _pallas_any_mesh(x2, w, route)
    elif uses_wide_kernel(w, x2.shape[0]):
        y = _wide_product(x2, w)
    elif uses_kernel(w, x2.shape[0]):
        y = _kernel_product(x2, w)
    elif w.activations == INT8_ACTIVATIONS:  # per-channel symmetric int8: pack() checks
        y = _int8_product(x2, w)
    else:
        y = _dense_product(x2, w)
    return y.reshape(*lead, w.out_features).astype(out_dtype)


def quantized_project_many(x: jax.Array, ws, out_dtype=None) -> list[jax.Array]:
    """[quantized_project(x, w, out_dtype) for w in ws], with the same values: where the
    native kernel runs them (uses_multi_kernel), in one call that quantizes x once."""
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    if not uses_multi_kernel(ws, x2.shape[0]):
        return [quantized_project(x, w, out_dtype) for w in ws]
    return [y.reshape(*lead, w.out_features).astype(out_dtype)
            for y, w in zip(_kernel_products(x2, ws), ws)]


def fuses_rms_norm(x: jax.Array, norm_weight: jax.Array, ws) -> bool:
    """Whether the products of rms_norm(x, norm_weight, eps) (layers/norms.py) times each of
    ws (PackedWeights all) can run as one kernel call that normalizes x itself
    (quantized_project_around): float32 x (the host CPU's activations; rms_norm's rounding
    for them) and a float32 or bfloat16 weight."""
    return (all(isinstance(w, PackedWeight) for w in ws) and x.dtype == jnp.float32
            and norm_weight.dtype in (jnp.float32, jnp.bfloat16)
            and uses_one_kernel_call(ws, math.prod(x.shape[:-1])))


def fuses_residual(x: jax.Array, w, residual: jax.Array) -> bool:
    """Whether residual + x times w (a PackedWeight) can run as one kernel call that adds the
    residual itself (quantized_project_around): float32 throughout and outputs in whole
    tiles (the kernel's padded width)."""
    return (isinstance(w, PackedWeight) and x.dtype == residual.dtype == jnp.float32
            and w.out_features % cpu_quantized.ROWS_PER_TILE == 0
            and uses_one_kernel_call([w], math.prod(x.shape[:-1])))


def quantized_project_around(x: jax.Array, ws, *, norm: tuple[jax.Array, float] | None = None,
                             residual: jax.Array | None = None) -> list[jax.Array]:
    """[residual + project(rms_norm(x, *norm), w) for w in ws] in one kernel call (each part
    where given; a residual with one weight only), in float32: the kernel normalizes x before
    quantizing it and adds the residual after, in place of XLA's five small passes around
    the call (benchmarks/RESULTS.md, 2026-12-05 eighth session). Needs fuses_rms_norm or
    fuses_residual."""
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    norm_weight, eps = norm if norm is not None else (None, 0.0)
    around = cpu_quantized.Surroundings(
        norm_weight=norm_weight, norm_eps=eps,
        residual=None if residual is None else residual.reshape(x2.shape[0], -1))
    return [y.reshape(*lead, w.out_features)
            for y, w in zip(_kernel_products(x2, ws, around), ws)]
