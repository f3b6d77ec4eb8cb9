"""Turning named checkpoint tensors into model parameters, with errors that name the tensor."""

import dataclasses
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from xla_inference.kernels import pallas_quantized_matmul as qmm
from xla_inference.loading.safetensors import CheckpointSlices, ExpertStackSlices
from xla_inference.parallel.axes import field_axes, is_projection
from xla_inference.quantization.experts import (PackedExperts, pack_experts, pack_experts_by_slice,
                                                quantize_experts,
                                                stored_for_step, with_compute_dtype)
from xla_inference.quantization.groups import GroupQuant
from xla_inference.quantization.online import quantize_per_channel
from xla_inference.quantization.packed import PackedWeight, pack
from xla_inference.quantization.sliced import as_group_quant, reads_by_block


class WeightMismatchError(ValueError):
    """A checkpoint tensor is missing or does not have the shape the config implies."""


class RandomTensors(Mapping):
    """A stand-in checkpoint for random weights (vLLM's --load-format dummy): every tensor
    a model asks for exists, drawn uniformly from [-1e-3, 1e-3] (as vLLM's dummy weights)
    in the shape the model's config implies, one at a time."""

    def __init__(self, seed: int = 0):
        self._rng = np.random.default_rng(seed)

    def shaped(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._rng.uniform(-1e-3, 1e-3, shape).astype(np.float32)

    def __contains__(self, name) -> bool:
        return True

    def __getitem__(self, name: str) -> np.ndarray:
        raise KeyError(f"random weights have no fixed shape for {name!r}; use take_tensor")

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def quantized_tensor(tensors: Mapping, name: str) -> GroupQuant | None:
    """The checkpoint's quantized form of `name`, where it holds one: a mapping over a
    quantized checkpoint (loading/checkpoint.py, GGUF's HFTensors) answers
    `quantized_weight(name)`; a plain one holds none."""
    reader = getattr(tensors, "quantized_weight", None)
    return reader(name) if reader is not None else None


def _checked(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]
             ) -> np.ndarray | GroupQuant:
    if isinstance(tensors, RandomTensors):
        return tensors.shaped(shape)
    quantized = quantized_tensor(tensors, name)
    if quantized is not None:
        if tuple(quantized.shape) != tuple(shape):
            raise WeightMismatchError(f"quantized tensor {name!r} has shape {quantized.shape}, "
                                      f"but the model config implies {shape}")
        return quantized
    if name not in tensors:
        raise WeightMismatchError(f"checkpoint has no tensor {name!r} (expected shape {shape})")
    array = tensors[name]
    if holds_quantized_values(array):
        raise WeightMismatchError(
            f"tensor {name!r} holds quantized values ({array.dtype}) but no quantization method "
            "covers it: the checkpoint's quantization_config is missing or does not name this "
            "module; refusing to read it as plain numbers")
    if tuple(array.shape) != tuple(shape):
        raise WeightMismatchError(
            f"tensor {name!r} has shape {tuple(array.shape)}, but the model config implies {shape}")
    return np.asarray(array)


def holds_quantized_values(array) -> bool:
    """Integers or FP8 where a float weight is expected: a quantized tensor read plainly."""
    dtype = np.dtype(array.dtype)
    return dtype.kind in "iu" or (dtype.itemsize == 1 and dtype.kind == "V") or "float8" in dtype.name


def _dense(array: np.ndarray | GroupQuant, dtype) -> np.ndarray:
    """A quantized tensor's float values (for what no quantized product consumes)."""
    if isinstance(array, GroupQuant):
        return array.dequantize(np.float32).astype(jnp.dtype(dtype))
    return array


def _to_host(array: np.ndarray | GroupQuant, dtype, transpose: bool) -> np.ndarray | GroupQuant:
    # Cast and lay out on the host; the engine then places each device's shard only
    # (parallel/sharding.py), so no device holds a full copy of a sharded tensor.
    # A quantized [out, in] weight stays quantized (pack_quantized decides, by the field it
    # lands in); transposed (MoE experts, MLA's per-head matrices), it is made dense.
    if isinstance(array, GroupQuant):
        if not transpose:
            return array
        array = _dense(array, dtype)
    array = array.astype(jnp.dtype(dtype), copy=False)
    if transpose:  # the last two axes: [out, in] -> [in, out], per expert for stacked weights
        array = np.swapaxes(array, -1, -2)
    return np.ascontiguousarray(array)


def take_tensor(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], dtype,
                *, transpose: bool = False):
    """Fetch `name`, check it has `shape` (checkpoint layout), cast, optionally transpose
    (the last two axes). A quantized checkpoint's weight comes back as its GroupQuant
    (untransposed); `dense` gives float values for code that reshapes or slices it.

    From a checkpoint that reads slices (loading/checkpoint.load_checkpoint's reads_slices:
    a multi-host process), a plain tensor comes back unread, a CheckpointSlices (transposed
    as a view): placement reads only this process's devices' slices of it, and a loader's
    per-head or per-part views of it (`part`, its reshape and transpose) stay unread."""
    checked = _checked(tensors, name, shape)
    if isinstance(checked, np.ndarray) and getattr(tensors, "reads_slices", False):
        lazy = CheckpointSlices(checked, jnp.dtype(dtype))
        if transpose:  # the last two axes: [out, in] -> [in, out]
            order = list(range(lazy.ndim))
            order[-2:] = order[:-3:-1]
            lazy = lazy.transpose(order)
        return lazy
    if transpose and reads_by_block(checked):
        # A quantized weight not read yet (QuantSlices), taken transposed: dense, so read
        # dequantized by block where placement asks (MLA's per-head matrices).
        return CheckpointSlices(checked, jnp.dtype(dtype)).transpose(1, 0)
    return _to_host(checked, dtype, transpose)


def part(array, index):
    """array[index] (slices or integer arrays per axis, every axis kept): a view of a
    tensor not read yet (CheckpointSlices.select) stays unread, so that placement reads
    only a device's slice of the part (a fused expert tensor's gate or up half, MLA's key
    or value rows of each head)."""
    if isinstance(array, CheckpointSlices):
        return array.select(index)
    return array[index]


def tensor_getter(tensors: Mapping[str, np.ndarray], dtype):
    """get(name, checkpoint shape, transpose=False) -> host array in `dtype` (take_tensor)."""
    return lambda name, shape, t=False: take_tensor(tensors, name, shape, dtype, transpose=t)


def take_stacked(tensors: Mapping[str, np.ndarray], names: Sequence[str], shape: tuple[int, ...],
                 dtype, *, transpose: bool = False):
    """The tensors `names` (one per expert), each of checkpoint `shape`, stacked on a new
    leading axis, cast, each optionally transposed. Quantized experts (each a GroupQuant)
    taken transposed stay quantized: a PackedExperts ([E, in, out] math,
    quantization/experts.py)."""
    stored = [_checked(tensors, n, shape) for n in names]
    if (transpose and stored and getattr(tensors, "reads_slices", False)
            and all(isinstance(s, np.ndarray) for s in stored)):
        # A multi-host process: placement reads only the experts (or the width slices of
        # each) its devices hold, from the per-expert tensors (ExpertStackSlices).
        return ExpertStackSlices(stored, jnp.dtype(dtype))
    if transpose:
        # Quantized experts not read yet (QuantSlices: a multi-host process): placement
        # reads each device's experts' blocks. None for any other experts.
        lazy = pack_experts_by_slice(stored)
        if lazy is not None:
            return lazy
    checked = [as_group_quant(s) for s in stored]
    if transpose and checked and all(isinstance(c, GroupQuant) for c in checked):
        return pack_experts(checked)
    stacked = np.stack([_dense(c, dtype) for c in checked])
    return _to_host(stacked, dtype, transpose)


def dense(array: np.ndarray | GroupQuant, dtype=np.float32) -> np.ndarray:
    """`array`, or a quantized weight's float values, for a loader that reshapes or slices
    a weight (MLA's kv_b_proj) rather than handing it to a product. One not read yet
    (QuantSlices: a multi-host process) stays unread, its views read dequantized by block
    (loading/safetensors.CheckpointSlices)."""
    if reads_by_block(array):
        return CheckpointSlices(array, jnp.dtype(dtype))
    return _dense(array, dtype)


def narrow_projections(params, dtype):
    """The matrices that layers/linear.py's `project` multiplies, cast to `dtype` (the
    precision policy's weight dtype: runner/build.py). Each parameter dataclass marks them
    where it declares them (parallel/axes.weight(..., projection=True)); everything else (the
    embedding, whose rows are gathered; norms; MoE experts and MLA's per-head matrices,
    which other products consume) keeps its dtype. A tied LM head becomes its own narrow
    array."""
    if isinstance(params, (list, tuple)):
        return type(params)(narrow_projections(p, dtype) for p in params)
    if not dataclasses.is_dataclass(params):
        return params
    changes = {}
    for field in dataclasses.fields(params):
        value = getattr(params, field.name)
        if isinstance(value, _QUANTIZED):
            continue  # quantized: its own layout and dtypes
        if is_projection(field) and value is not None:
            # A CheckpointSlices stays unread: it is read in the narrow dtype.
            value = value if isinstance(value, CheckpointSlices) else np.asarray(value)
            changes[field.name] = value.astype(jnp.dtype(dtype))
        elif isinstance(value, (list, tuple)) or dataclasses.is_dataclass(value):
            changes[field.name] = narrow_projections(value, dtype)
    return dataclasses.replace(params, **changes)


# Quantized weights: leaves of a parameter tree, never walked into.
_QUANTIZED = (GroupQuant, PackedWeight, PackedExperts)


def _map_fields(params, change):
    """params with change(field, value) applied to every leaf field of every parameter
    dataclass (lists of layers included); change returns the new value."""
    if isinstance(params, (list, tuple)):
        return type(params)(_map_fields(p, change) for p in params)
    if not dataclasses.is_dataclass(params) or isinstance(params, _QUANTIZED):
        return params
    changes = {}
    for field in dataclasses.fields(params):
        value = getattr(params, field.name)
        if isinstance(value, (list, tuple)) or (dataclasses.is_dataclass(value) and not
                                                isinstance(value, _QUANTIZED)):
            changes[field.name] = _map_fields(value, change)
        else:
            changes[field.name] = change(field, value)
    return dataclasses.replace(params, **changes)


def pack_quantized(params, compute_dtype, dense_dtype):
    """Quantized weights into the device layout: a projection's GroupQuant becomes a
    PackedWeight (quantization/packed.py) whose products dequantize into `compute_dtype`
    where they do not run integer kernels; a quantized tensor anywhere else (a GGUF
    embedding, whose rows are gathered) becomes float `dense_dtype`. One GroupQuant in two
    fields (a tied embedding and LM head) is packed once. Quantized MoE experts
    (PackedExperts, already stacked at load) dequantize into `compute_dtype` too.

    Where a Pallas quantized matmul will serve (a TPU or GPU, or one forced in interpret
    mode: kernels/pallas_quantized_matmul.quantized_matmul_route), each projection it takes
    is stored in its layout, here, once (packed.K_MAJOR); likewise the MoE experts where
    the Pallas grouped matmul will serve them (kernels/pallas_gmm.gmm_route:
    quantization/experts.stored_for_step)."""
    packed: dict[int, PackedWeight] = {}
    route = qmm.quantized_matmul_route()
    accelerator = None if route is None else route.backend

    def change(field, value):
        if isinstance(value, PackedExperts):  # K_MAJOR where the Pallas GMM will serve
            return stored_for_step(with_compute_dtype(value, compute_dtype))
        if not isinstance(value, GroupQuant):
            return value
        if not is_projection(field):
            return _dense(value, dense_dtype)
        if id(value) not in packed:
            packed[id(value)] = pack(value, compute_dtype, accelerator=accelerator)
        return packed[id(value)]

    return _map_fields(params, change)


def quantize_projections(params, kind: str):
    """Online quantization: every float projection matrix quantized per output channel to
    `kind` (quantization/online.py), and every float MoE expert stack [E, in, out] per
    expert and output channel (quantization/experts.py); everything else is left as it is."""
    def change(field, value):
        if isinstance(value, CheckpointSlices):  # quantized from the whole tensor
            value = np.asarray(value)
        if is_projection(field) and isinstance(value, np.ndarray) and value.ndim == 2:
            return quantize_per_channel(value, kind)
        if _is_expert_stack(field, value):
            return quantize_experts(value, kind)
        return value

    return _map_fields(params, change)


def _is_expert_stack(field, value) -> bool:
    """A float [E, in, out] stack of MoE experts (a field whose first logical axis is the
    experts: layers/moe.MoeMlp's w_gate, w_up, w_down)."""
    axes = field_axes(field)
    return (bool(axes) and axes[0] == "experts" and isinstance(value, np.ndarray)
            and value.ndim == 3)
