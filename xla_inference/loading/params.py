"""Turning named checkpoint tensors into model parameters, with errors that name the tensor."""

import dataclasses
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np


class WeightMismatchError(ValueError):
    """A checkpoint tensor is missing or does not have the shape the config implies."""


def _checked(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
        raise WeightMismatchError(f"checkpoint has no tensor {name!r} (expected shape {shape})")
    array = tensors[name]
    if tuple(array.shape) != tuple(shape):
        raise WeightMismatchError(
            f"tensor {name!r} has shape {tuple(array.shape)}, but the model config implies {shape}")
    return np.asarray(array)


def _to_host(array: np.ndarray, dtype, transpose: bool) -> np.ndarray:
    # Cast and lay out on the host; the engine then places each device's shard only
    # (parallel/sharding.py), so no device holds a full copy of a sharded tensor.
    array = array.astype(jnp.dtype(dtype), copy=False)
    if transpose:  # the last two axes: [out, in] -> [in, out], per expert for stacked weights
        array = np.swapaxes(array, -1, -2)
    return np.ascontiguousarray(array)


def take_tensor(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], dtype,
                *, transpose: bool = False):
    """Fetch `name`, check it has `shape` (checkpoint layout), cast, optionally transpose
    (the last two axes)."""
    return _to_host(_checked(tensors, name, shape), dtype, transpose)


def take_stacked(tensors: Mapping[str, np.ndarray], names: Sequence[str], shape: tuple[int, ...],
                 dtype, *, transpose: bool = False):
    """The tensors `names` (one per expert), each of checkpoint `shape`, stacked on a new
    leading axis, cast, each optionally transposed."""
    return _to_host(np.stack([_checked(tensors, n, shape) for n in names]), dtype, transpose)


def narrow_projections(params, dtype):
    """The matrices that layers/linear.py's `project` multiplies, cast to `dtype` (bfloat16
    weights with float32 activations: plugin/worker.py). Each parameter dataclass names
    them in its PROJECTIONS; everything else (the embedding, whose rows are gathered;
    norms; MoE experts and MLA's per-head matrices, which other products consume) keeps its
    dtype. A tied LM head becomes its own narrow array."""
    if isinstance(params, (list, tuple)):
        return type(params)(narrow_projections(p, dtype) for p in params)
    if not dataclasses.is_dataclass(params):
        return params
    narrowed = set(getattr(params, "PROJECTIONS", ()))
    changes = {}
    for field in dataclasses.fields(params):
        value = getattr(params, field.name)
        if field.name in narrowed:
            changes[field.name] = np.asarray(value).astype(jnp.dtype(dtype))
        elif isinstance(value, (list, tuple)) or dataclasses.is_dataclass(value):
            changes[field.name] = narrow_projections(value, dtype)
    return dataclasses.replace(params, **changes)
