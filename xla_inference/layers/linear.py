"""Linear projections. Weights stay in the checkpoint's [out, in] layout: loading needs no
transpose, and XLA's CPU backend runs the small decode buckets faster with it (measured
against [in, out]: benchmarks/RESULTS.md).

Weights may be stored narrower than the activations: on the host CPU, dtype=bfloat16 keeps
the projection matrices in bfloat16 and the activations in float32 (the precision policy,
runner/build.Precision); each product then rounds its input to bfloat16 and accumulates
in float32.

Quantized weights (PackedWeight) take quantization/product.py's products instead: every
family's projections go through `project`, so every family serves quantized checkpoints.

Under tensor parallel the row-parallel projections (attention output, MLP down) take
row_parallel_project: a collective matmul (parallel/collective_matmul.py) instead of
GSPMD's product + all-reduce."""

import math

import jax
import jax.numpy as jnp

from xla_inference.kernels import cpu_dense
from xla_inference.layers.norms import DeferredRmsNorm
from xla_inference.lora.slots import LoraWeight
from xla_inference.parallel import collective_matmul
from xla_inference.parallel.sharding import TENSOR_AXIS, splits, tensor_parallel_mesh
from xla_inference.quantization.packed import PackedWeight
from xla_inference.quantization.product import (fuses_residual, fuses_rms_norm,
                                                 quantized_project, quantized_project_around,
                                                 quantized_project_many)


def project(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """x [..., in] times w [out, in] -> [..., out] in `out_dtype` (default x's dtype).

    A weight narrower than x (bfloat16 against float32 activations): x is rounded to the
    weight's dtype and the product accumulates in float32, as on an accelerator's matrix
    unit. XLA's CPU backend runs such a product with more than one row on its bfloat16
    kernels (`avx512_bf16` where the CPU has it: faster than float32); on a CPU without
    them, wide products (prefill) run in float32 on the widened operands instead, the same
    numbers (kernels/cpu_dense.bfloat16_product). For a single row it
    is written against the weight's transpose, which XLA fuses into one matrix-vector loop
    over every core that reads the bfloat16 bytes; in the [out, in] form that row is many
    times slower (benchmarks/RESULTS.md, "Figures moved from code comments"). On the host
    CPU that one-row product of a bfloat16 weight runs the native kernel instead
    (kernels/cpu_dense.py: the same sums in another order; 2-6x faster than XLA's loop with
    the weight in cache, benchmarks/RESULTS.md issue 18).
    """
    if isinstance(w, PackedWeight):  # a quantized checkpoint (quantization/product.py)
        return quantized_project(x, w, out_dtype)
    if isinstance(w, LoraWeight):  # the base product plus each token's adapter (lora/slots.py)
        base = project(x, w.base, out_dtype)
        if w.active is None:
            return base + lora_delta(x, w, out_dtype or x.dtype)
        return jax.lax.cond(w.active, lambda: base + lora_delta(x, w, out_dtype or x.dtype),
                            lambda: base)
    out_dtype = out_dtype or x.dtype
    if w.dtype.itemsize >= x.dtype.itemsize:
        return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=out_dtype)
    accumulate = jnp.promote_types(out_dtype, jnp.float32)
    x = x.astype(w.dtype)
    rows = math.prod(x.shape[:-1])
    if rows == 1 and _native_matvec(w):
        y = cpu_dense.dense_matvec(x.reshape(1, -1), w).reshape(*x.shape[:-1], w.shape[0])
    elif 1 < rows <= NATIVE_MATMUL_MAX_ROWS and _native_matmul(w):
        y = cpu_dense.dense_matmul(x.reshape(rows, -1), w).reshape(*x.shape[:-1], w.shape[0])
    elif rows == 1:
        y = jnp.einsum("...i,io->...o", x, w.T, preferred_element_type=accumulate)
    elif w.ndim == 2:
        y = cpu_dense.bfloat16_product(x.reshape(rows, -1), w, accumulate)
        y = y.reshape(*x.shape[:-1], w.shape[0])
    else:
        y = jnp.einsum("...i,oi->...o", x, w, preferred_element_type=accumulate)
    return y.astype(out_dtype)


def project_many(x: jax.Array | DeferredRmsNorm, ws, out_dtype=None) -> list[jax.Array]:
    """[project(x, w, out_dtype) for w in ws]: the products of a layer that share their
    input (q, k, v; gate, up). Quantized weights run as one kernel call where the native
    CPU kernel takes them all (quantization/product.quantized_project_many: the same values
    in one launch). x may be a norm not yet taken (a DeferredRmsNorm), which that call
    then takes itself (quantization/product.quantized_project_around)."""
    if isinstance(x, DeferredRmsNorm):
        if fuses_rms_norm(x.x, x.weight, ws):
            ys = quantized_project_around(x.x, ws, norm=(x.weight, x.eps))
            return [y.astype(out_dtype or x.x.dtype) for y in ys]
        x = x.value()
    if len(ws) > 1 and all(isinstance(w, PackedWeight) for w in ws):
        return quantized_project_many(x, ws, out_dtype)
    if len(ws) > 1 and all(isinstance(w, LoraWeight) and isinstance(w.base, PackedWeight)
                           for w in ws):  # adapters over a quantized base: its one launch
        bases = quantized_project_many(x, [w.base for w in ws], out_dtype)
        return [y + lora_delta(x, w, out_dtype or x.dtype) for y, w in zip(bases, ws)]
    if len(ws) > 1 and _native_matvec_many(x, ws):  # bfloat16 one-row products: one launch
        ys = cpu_dense.dense_matvec_multi(x.reshape(1, -1), ws)
        out_dtype = out_dtype or x.dtype
        return [y.reshape(*x.shape[:-1], w.shape[0]).astype(out_dtype) for y, w in zip(ys, ws)]
    return [project(x, w, out_dtype) for w in ws]


def _native_matvec_many(x: jax.Array, ws) -> bool:
    """Whether every w in ws is a plain bfloat16 weight narrower than the one row x whose
    one-row product `project` would give the native kernel: then one multi call does them
    all with the same bits."""
    return (math.prod(x.shape[:-1]) == 1
            and all(isinstance(w, jax.Array) and w.dtype.itemsize < x.dtype.itemsize
                    and _native_matvec(w)
                    and w.shape[1] == x.shape[-1] for w in ws))


def linear_many(x: jax.Array, ws, bs) -> list[jax.Array]:
    """[linear(x, w, b) for w, b in zip(ws, bs)], the products by project_many."""
    return [y if b is None else y + b for y, b in zip(project_many(x, ws), bs)]


def _host_bfloat16_weight(w: jax.Array) -> bool:
    """Whether w is a bfloat16 matrix multiplied on the host CPU outside a tensor-parallel
    mesh (XLA's partitioner would gather the weight operand of a custom call onto every
    device): what the native dense kernels take."""
    return (w.dtype == jnp.bfloat16 and w.ndim == 2 and jax.default_backend() == "cpu"
            and tensor_parallel_mesh() is None)


def _native_matvec(w: jax.Array) -> bool:
    """Whether a one-row product of w runs the native CPU kernel."""
    return _host_bfloat16_weight(w) and cpu_dense.available()


# The most rows whose product with a bfloat16 weight takes the AMX kernel on the host CPU
# (kernels/cpu_dense.dense_matmul): a batched decode step's. Against XLA's product of
# SmolLM2's weights it is 1.3-3x faster from 2 to 64 rows, about even at 128, and slower
# from 256 on, where XLA's blocked product reuses each loaded tile more
# (benchmarks/dense_matmul.py).
NATIVE_MATMUL_MAX_ROWS = 128


def _native_matmul(w: jax.Array) -> bool:
    """Whether a product of a few rows (2..NATIVE_MATMUL_MAX_ROWS) times the bfloat16 weight w
    runs the native AMX kernel (a CPU with AMX-BF16 tiles)."""
    return _host_bfloat16_weight(w) and cpu_dense.matmul_available()


def lora_delta(x: jax.Array, w: LoraWeight, out_dtype) -> jax.Array:
    """x [..., in] -> [..., out]: each token's adapter's (x A^T) B^T, zero for slot 0.

    The shrink multiplies x by the whole group's A (every member module and slot): the
    group's members (q/k/v; gate/up) each write this same product, which XLA's CSE turns
    into one. Its member's L*r columns, masked to each token's own slot, then take one
    expand over all slots' B. Both products are `project`'s, in the stacks' dtype with a
    float32 accumulator where that is narrower than x (bfloat16 on the host CPU)."""
    columns = w.b.shape[1]
    xa = project(x, w.a, jnp.float32)  # [..., G*L*r]
    mine = xa[..., w.member * columns:(w.member + 1) * columns]
    mask = w.column_mask.reshape(*mine.shape[:-1], columns)
    masked = jnp.where(mask, mine, 0.0)
    if math.prod(x.shape[:-1]) == 1:  # one token: B as [L*r, out] float32, read as stored
        rounded = masked.astype(w.b.dtype).astype(jnp.float32)  # as the product rounds it
        return jnp.einsum("...k,ko->...o", rounded, w.b_rows).astype(out_dtype)
    return project(masked, w.b, out_dtype)


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x [..., in] times w [out, in] -> [..., out], plus b [out] when the checkpoint has one."""
    y = project(x, w)
    return y if b is None else y + b


def row_parallel_project(x: jax.Array, w, b: jax.Array | None = None, *, logical_axis: str,
                         units: int, residual: jax.Array | None = None) -> jax.Array:
    """linear(x, w, b) for a row-parallel weight w [out, in] whose input axis holds `units`
    of `logical_axis` ("heads", "mlp"). Where the step is traced over a tensor-parallel
    mesh that splits that axis (parallel/sharding.tensor_parallel_mesh) and the ring pays
    for this many rows (collective_matmul.ring_pays: accelerators, larger steps), the
    product is a ring reduce-scatter + all-gather around the devices, each partial product
    beside a permute in flight; the result is whole on every device, as GSPMD's all-reduce
    leaves it. Elsewhere, and for quantized weights (their products are
    quantization/product.py's; GSPMD still partitions them), plain linear().

    residual (the layer's residual stream, [..., out]) is added to the result: by the
    quantized kernel's call itself where it can (quantization/product.fuses_residual), in
    place of XLA's add after it."""
    if residual is not None:
        if b is None and fuses_residual(x, w, residual):
            return quantized_project_around(x, [w], residual=residual)[0]
        return row_parallel_project(x, w, b, logical_axis=logical_axis, units=units) + residual
    mesh = tensor_parallel_mesh()
    if (mesh is None or isinstance(w, (PackedWeight, LoraWeight))
            or not collective_matmul.ring_pays(math.prod(x.shape[:-1]))
            or not splits(mesh, logical_axis, units, w.shape[1])
            or w.shape[0] % mesh.shape[TENSOR_AXIS]):
        return linear(x, w, b)
    y = collective_matmul.row_parallel_matmul(x, w, mesh, product=project)
    return y if b is None else y + b
