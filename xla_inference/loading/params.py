"""Turning named checkpoint tensors into model parameters, with errors that name the tensor."""

import dataclasses
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from xla_inference.parallel.axes import is_projection


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


def _checked(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(tensors, RandomTensors):
        return tensors.shaped(shape)
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


def tensor_getter(tensors: Mapping[str, np.ndarray], dtype):
    """get(name, checkpoint shape, transpose=False) -> host array in `dtype` (take_tensor)."""
    return lambda name, shape, t=False: take_tensor(tensors, name, shape, dtype, transpose=t)


def take_stacked(tensors: Mapping[str, np.ndarray], names: Sequence[str], shape: tuple[int, ...],
                 dtype, *, transpose: bool = False):
    """The tensors `names` (one per expert), each of checkpoint `shape`, stacked on a new
    leading axis, cast, each optionally transposed."""
    return _to_host(np.stack([_checked(tensors, n, shape) for n in names]), dtype, transpose)


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
        if is_projection(field) and value is not None:
            changes[field.name] = np.asarray(value).astype(jnp.dtype(dtype))
        elif isinstance(value, (list, tuple)) or dataclasses.is_dataclass(value):
            changes[field.name] = narrow_projections(value, dtype)
    return dataclasses.replace(params, **changes)
