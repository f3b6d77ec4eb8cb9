"""Quantized weights as the device holds them (PackedWeight), made from the host form
(groups.GroupQuant) once at load.

Integer weights (4- and 8-bit) are laid out in tiles of 16 output rows, the operand layout
of the native CPU kernel (kernels/cpu/quantized_matmul.cc): each 32-byte chunk holds two
(8-bit) or four (4-bit, two per byte) consecutive input elements of 16 rows, so one vector
load feeds 16 rows' products. Scales and offsets are laid out [row tile, group, 16], each
in float16 where every one of its values is a float16 (GPTQ's and AWQ's scales, GGUF's
Q4_0/Q8_0 block scales: a 4-bit weight in groups of 32 is then 5 bits rather than 6, and
decode reads that much less) and float32 otherwise (the product is exact either way).
Offsets that are all -z * scale for one integer z (a symmetric format's midpoint: GPTQ's
and compressed-tensors' symmetric 4-bit, GGUF's Q4_0) need not be stored: with
pack(..., zero_point=True) the weight keeps z (zero_point) instead, and products subtract
it from the values (opt-in for now; experts.py carries zero_point into its experts). On
other devices XLA dequantizes the tiles inside the product (`dequantize`): the layout is a
reshape and a transpose of the plain one, which XLA folds into the dequantizing fusion.
FP8 weights keep the plain [out, in] layout (XLA converts them in the product).

For a TPU or GPU whose Pallas quantized matmul will multiply the weight
(kernels/pallas_quantized_matmul.quantized_matmul_route, passed to pack as `accelerator`),
every kind is stored instead in that kernel's K-major layout (its module docstring: values
[in, out], 4-bit ones two inputs a byte [in / 2, out]; scales and offsets [groups, out]),
converted here, once, so that a step hands the stored arrays to the kernel unchanged.

Groups are at most 128 input elements (larger groups, e.g. one scale per row, are split
into equal parts), so the kernel's int32 sums over a group cannot overflow."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.kernels import pallas_quantized_matmul as qmm
from xla_inference.quantization.groups import (FP8, INT4, INT8, INT8_ACTIVATIONS, GroupQuant,
                                               regroup)
from xla_inference.quantization.sliced import (GROUPS, VALUES, LazyArray, QuantSlices,
                                               reads_by_block)

TILE_ROWS = 16
MAX_GROUP = 128
_CHUNK_INPUTS = {INT8: 2, INT4: 4}  # input elements of one row in a 32-byte chunk
# Layouts: OUT_IN, the native CPU kernel's tiles (FP8: plain [out, in]); K_MAJOR, the
# Pallas quantized matmul's (kernels/pallas_quantized_matmul.py).
OUT_IN, K_MAJOR = "out-in", "k-major"


def _static(**kwargs) -> dataclasses.Field:
    return dataclasses.field(metadata={"static": True}, **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedWeight:
    """A quantized [out_features, in_features] projection weight on the device.

    values: INT8 int8 [out/16, in/2, 32]; INT4 uint8 [out/16, in/4, 32] (tile layout, out
    padded to a multiple of 16); FP8 float8_e4m3fn [out, in].
    scales, offsets: [out/16, groups, 16] (FP8: [out, groups]), each float16 where that
    holds its values exactly and float32 otherwise (group_array); offsets may be None.
    layout K_MAJOR (any kind): values [in, out] (INT4: uint8 [in/2, out], two inputs a
    byte), scales and offsets [groups, out]: the Pallas quantized matmul's operands.
    zero_point: an integer subtracted from every value before scaling (0: none)
    w[o, k] = (q[o, k] - zero_point) * scale[o, g] + offset[o, g]."""

    values: jax.Array
    scales: jax.Array
    offsets: jax.Array | None
    kind: str = _static()
    group_size: int = _static()
    out_features: int = _static()
    in_features: int = _static()
    activations: str = _static()
    # The dtype a product dequantizes into when it does not use the native kernel
    # (the precision policy's weight dtype: bfloat16 halves the dequantized copy).
    compute_dtype: str = _static(default="float32")
    zero_point: int = _static(default=0)
    layout: str = _static(default=OUT_IN)
    # K_MAJOR under tensor parallel: the axis of `values` the tensor axis splits (0: the
    # inputs, 1: the outputs; None: neither), set when the engine places the weight
    # (parallel/sharding.mark_tensor_splits); products partition by hand from it.
    tensor_split: int | None = _static(default=None)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def tiled(self) -> bool:
        """In the native CPU kernel's tiles (4- and 8-bit integers in the OUT_IN layout)."""
        return self.kind in _CHUNK_INPUTS and self.layout == OUT_IN

    @property
    def k_major(self) -> bool:
        return self.layout == K_MAJOR

    @property
    def bits(self) -> int:
        return 4 if self.kind == INT4 else 8

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in (self.values, self.scales, self.offsets) if a is not None)


def kernel_group_size(group_size: int, in_features: int, kind: str) -> int:
    """The largest group of at most MAX_GROUP inputs that splits `group_size` evenly and
    is a whole number of the kernel's chunks."""
    step = _CHUNK_INPUTS.get(kind, 1)
    for size in range(min(group_size, MAX_GROUP), 0, -1):
        if group_size % size == 0 and size % step == 0:
            return size
    raise ValueError(f"a group of {group_size} inputs (in = {in_features}) cannot be split into "
                     f"groups of a multiple of {step}")


def group_array(a: np.ndarray) -> np.ndarray:
    """Scales or offsets in float16 if every value is exactly a float16 (half the bytes
    a product reads per group), else in float32; never rounded."""
    with np.errstate(over="ignore"):  # values beyond float16's range: float32
        half = a.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), a) else a.astype(np.float32)


def common_zero_point(scales: np.ndarray, offsets: np.ndarray) -> int | None:
    """z if every offset is exactly -z * its scale for one integer |z| <= 255, else None."""
    s, o = scales.astype(np.float64), offsets.astype(np.float64)
    nonzero = np.flatnonzero(s)
    if nonzero.size == 0:
        return 0 if not o.any() else None
    z = -o.flat[nonzero[0]] / s.flat[nonzero[0]]
    if not (z == np.round(z) and abs(z) <= 255):
        return None
    z = int(z)
    return z if np.array_equal(-z * s, o) else None  # exact: float64 holds -z * s


def _tile_rows(a: np.ndarray, out_padded: int) -> np.ndarray:
    """[out, n] -> [out_padded / 16, n, 16]: padding rows are zero."""
    padded = np.zeros((out_padded, a.shape[1]), a.dtype)
    padded[:a.shape[0]] = a
    return np.ascontiguousarray(padded.reshape(-1, TILE_ROWS, a.shape[1]).transpose(0, 2, 1))


def _tile_values(values: np.ndarray, kind: str, out_padded: int) -> np.ndarray:
    out, inp = values.shape
    padded = np.zeros((out_padded, inp), values.dtype)
    padded[:out] = values
    tiles = padded.reshape(-1, TILE_ROWS, inp)  # [OT, 16, in]
    if kind == INT8:  # chunk c, byte 2r + j = q[r, 2c + j]
        chunks = tiles.reshape(tiles.shape[0], TILE_ROWS, inp // 2, 2).transpose(0, 2, 1, 3)
        return np.ascontiguousarray(chunks.reshape(tiles.shape[0], inp // 2, 2 * TILE_ROWS))
    # INT4: chunk c, byte 2r + j = q[r, 4c + j] | q[r, 4c + 2 + j] << 4
    quads = tiles.reshape(tiles.shape[0], TILE_ROWS, inp // 4, 2, 2).astype(np.uint8)
    packed = quads[:, :, :, 0, :] | (quads[:, :, :, 1, :] << 4)  # [OT, 16, in/4, 2 (j)]
    return np.ascontiguousarray(packed.transpose(0, 2, 1, 3).reshape(tiles.shape[0], inp // 4,
                                                                     2 * TILE_ROWS))


def _pack_k_major(weight: GroupQuant, zero_point: int | None, compute_dtype: str
                  ) -> PackedWeight:
    """The Pallas quantized matmul's layout (K_MAJOR) of a host GroupQuant."""
    out, inp = weight.shape
    values = weight.values.T
    if weight.kind == INT4:
        values = qmm.pack_int4(values)  # numpy in, numpy out
    groups = lambda a: np.ascontiguousarray(group_array(a).T)  # noqa: E731  [groups, out]
    offsets = (None if weight.offsets is None or zero_point is not None
               else groups(weight.offsets))
    return PackedWeight(np.ascontiguousarray(values), groups(weight.scales), offsets,
                        weight.kind, weight.group_size, out, inp, weight.activations,
                        compute_dtype, zero_point or 0, K_MAJOR)


def pack(weight: GroupQuant, compute_dtype="float32", *, zero_point: bool = False,
         accelerator: str | None = None) -> PackedWeight:
    """The device layout of a host GroupQuant (numpy arrays; placed by the engine);
    zero_point: offsets that are -z * scale for one integer z become zero_point z.
    accelerator: the Pallas quantized matmul backend ("tpu" or "gpu") that will multiply
    the weight; where its kernels take the weight's shape and groups, the weight is stored
    in their layout (K_MAJOR), else in the CPU kernel's (OUT_IN: XLA dequantizes it)."""
    out, inp = weight.shape
    compute_dtype = jnp.dtype(compute_dtype).name
    if reads_by_block(weight):
        sliced = _pack_by_slice(weight, compute_dtype, zero_point, accelerator)
        if sliced is not None:
            return sliced
        weight = weight.whole()
    if weight.activations == INT8_ACTIVATIONS and (
            weight.kind != INT8 or weight.offsets is not None or weight.group_size != inp):
        raise ValueError("int8 activations need symmetric int8 weights with one scale per "
                         "output channel (compressed-tensors W8A8 int8)")
    if weight.kind != FP8:
        weight = regroup(weight, kernel_group_size(weight.group_size, inp, weight.kind))
    z = (common_zero_point(weight.scales, weight.offsets)
         if zero_point and weight.offsets is not None and weight.kind != FP8 else None)
    if accelerator and qmm.layout_supported(inp, out, bits=4 if weight.kind == INT4 else 8,
                                            group_size=weight.group_size, backend=accelerator):
        return _pack_k_major(weight, z, compute_dtype)
    if weight.kind == FP8:
        return PackedWeight(weight.values, weight.scales, weight.offsets, FP8, weight.group_size,
                            out, inp, weight.activations, compute_dtype)
    out_padded = -(-out // TILE_ROWS) * TILE_ROWS
    offsets = (None if weight.offsets is None or z is not None
               else _tile_rows(group_array(weight.offsets), out_padded))
    return PackedWeight(_tile_values(weight.values, weight.kind, out_padded),
                        _tile_rows(group_array(weight.scales), out_padded), offsets, weight.kind,
                        weight.group_size, out, inp, weight.activations, compute_dtype,
                        z or 0)


# ------------------------------------------------------------------ read where placed

def _pack_by_slice(weight: QuantSlices, compute_dtype: str, zero_point: bool,
                   accelerator: str | None) -> PackedWeight | None:
    """A weight not read yet (quantization/sliced.QuantSlices) packed as arrays that read,
    when placement asks for a device's slice, only that slice's rows and columns from the
    checkpoint (PackedSlices). Scales and offsets are float16 where the format stores
    them so (QuantSlices.half_groups), else float32 (the whole weight's float16 test,
    group_array, would read them all): the same values, at most a few more bytes. None where the
    layout is not cut this way (the Pallas kernels' K-major layout, whose 4-bit bytes pair
    distant inputs; a common zero point, a whole-weight property): packed from the whole."""
    out, inp = weight.shape
    if zero_point:
        return None
    if weight.activations == INT8_ACTIVATIONS and (
            weight.kind != INT8 or weight.has_offsets or weight.group_size != inp):
        return None  # pack() refuses it, from the whole weight
    group = (weight.group_size if weight.kind == FP8
             else kernel_group_size(weight.group_size, inp, weight.kind))
    if accelerator and qmm.layout_supported(inp, out, bits=4 if weight.kind == INT4 else 8,
                                            group_size=group, backend=accelerator):
        return None
    arrays = ("values", "scales", "offsets") if weight.has_offsets else ("values", "scales")
    parts = {name: PackedSlices(weight, name, group, len(arrays)) for name in arrays}
    return PackedWeight(parts["values"], parts["scales"], parts.get("offsets"), weight.kind,
                        group, out, inp, weight.activations, compute_dtype)


class PackedSlices(LazyArray):
    """One array (values, scales or offsets) of a packed weight not read yet: its shape
    and dtype, and `self[index]` reading from the checkpoint only the rows and input
    columns that slice of the packed layout holds (whole row tiles of 16 and whole input
    chunks or groups, as placement's slices are), packed as pack() packs them. Anything
    else numpy does with it reads the whole array."""

    def __init__(self, weight: QuantSlices, name: str, group: int, uses: int):
        self.weight, self.name, self.group, self.uses = weight, name, group, uses
        out, inp = weight.shape
        self.tiled = weight.kind != FP8
        if not self.tiled:  # [out, in] and [out, groups]
            self.shape = (out, inp) if name == "values" else (out, inp // group)
            self.dtype = np.dtype(_VALUE_DTYPE[FP8]) if name == "values" else np.dtype(np.float32)
            self.units = (1, 1 if name == "values" else group)
        elif name == "values":  # [out / 16, in / chunk, 32]
            step = _CHUNK_INPUTS[weight.kind]
            self.shape = (-(-out // TILE_ROWS), inp // step, 2 * TILE_ROWS)
            self.dtype = np.dtype(_VALUE_DTYPE[weight.kind])
            self.units = (TILE_ROWS, step)
        else:  # [out / 16, groups, 16]
            self.shape = (-(-out // TILE_ROWS), inp // group, TILE_ROWS)
            self.dtype = np.dtype(np.float16 if name in weight.half_groups else np.float32)
            self.units = (TILE_ROWS, group)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        spans = [_span(i, dim) for i, dim in zip(index[:2], self.shape[:2])]
        if any(s is None for s in spans) or len(index) != self.ndim:
            return np.asarray(self)[index]  # an index placement never asks for: read whole
        (t0, t1), (u0, u1) = spans
        out, inp = self.weight.shape
        row_unit, col_unit = self.units
        rows = slice(t0 * row_unit, min(t1 * row_unit, out))
        c0, c1 = u0 * col_unit, min(u1 * col_unit, inp)
        # Values may cut a group (their unit is a chunk): then the block's groups are smaller.
        group = math.gcd(self.group, c0, c1)
        block = self.weight.part_of_block(rows, c0, c1, group,
                                          VALUES if self.name == "values" else GROUPS,
                                          self.uses)
        return self._layout(block, t1 - t0)[(slice(None), slice(None), *index[2:])]

    def _layout(self, block: GroupQuant, row_units: int) -> np.ndarray:
        array = getattr(block, self.name)
        if not self.tiled:
            return np.ascontiguousarray(array if self.name == "values"
                                        else array.astype(np.float32))
        padded = row_units * TILE_ROWS
        if self.name == "values":
            return _tile_values(array, block.kind, padded)
        return _tile_rows(array.astype(self.dtype), padded)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[tuple(slice(None) for _ in self.shape)]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return np.asarray(self).astype(dtype, copy=copy)

    def __repr__(self) -> str:
        return f"PackedSlices({self.weight.name}.{self.name}, {self.shape}, {self.dtype})"


_VALUE_DTYPE = {INT8: np.int8, INT4: np.uint8, FP8: jnp.float8_e4m3fn}


def _span(index, dim: int) -> tuple[int, int] | None:
    """[start, stop) of a plain slice (step 1) along an axis of `dim`; None otherwise."""
    if not isinstance(index, slice) or index.step not in (None, 1):
        return None
    start, stop, _ = index.indices(dim)
    return (start, stop) if stop > start else None


# ------------------------------------------------------------------ on the device (jnp)

def untiled_values(w: PackedWeight) -> jax.Array:
    """The integer values [out_padded, in] (int8 for INT8, 0..15 as uint8 for INT4; K_MAJOR
    and FP8: [out, in])."""
    v = w.values
    if w.k_major:
        return (qmm.unpack_int4(v) if w.kind == INT4 else v).T
    if w.kind == FP8:
        return v
    tiles, chunks = v.shape[0], v.shape[1]
    if w.kind == INT8:
        q = v.reshape(tiles, chunks, TILE_ROWS, 2).transpose(0, 2, 1, 3)
    else:
        pairs = v.reshape(tiles, chunks, TILE_ROWS, 2)  # byte (r, j) of chunk c
        q = jnp.stack([pairs & 15, pairs >> 4], axis=3)  # [OT, C, 16, half, j]
        q = q.transpose(0, 2, 1, 3, 4)
    return q.reshape(tiles * TILE_ROWS, w.in_features)


def untiled_groups(a: jax.Array, w: PackedWeight) -> jax.Array:
    """Scales or offsets as [out_padded, groups] float32 (stored float16 or float32)."""
    a = a.astype(jnp.float32)
    if w.k_major:
        return a.T
    return a if not w.tiled else a.transpose(0, 2, 1).reshape(-1, a.shape[1])


def dequantize(w: PackedWeight, dtype=None) -> jax.Array:
    """The [out_features, in_features] weight in `dtype` (default w.compute_dtype)."""
    dtype = jnp.dtype(dtype or w.compute_dtype)
    groups = w.num_groups
    values = untiled_values(w).astype(jnp.float32).reshape(-1, groups, w.group_size)
    if w.zero_point:
        values = values - w.zero_point  # exact: small integers
    out = values * untiled_groups(w.scales, w)[..., None]
    if w.offsets is not None:
        out = out + untiled_groups(w.offsets, w)[..., None]
    return out.reshape(-1, w.in_features)[:w.out_features].astype(dtype)


def host_nbytes(tree) -> int:
    """Bytes of every array leaf of a parameter tree (packed weights counted packed)."""
    return sum(int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree))
