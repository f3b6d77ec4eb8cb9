"""Turning named checkpoint tensors into model parameters, with errors that name the tensor."""

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np


class WeightMismatchError(ValueError):
    """A checkpoint tensor is missing or does not have the shape the config implies."""


def take_tensor(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], dtype,
                *, transpose: bool = False):
    """Fetch `name`, check it has `shape` (checkpoint layout), cast, optionally transpose."""
    if name not in tensors:
        raise WeightMismatchError(f"checkpoint has no tensor {name!r} (expected shape {shape})")
    array = tensors[name]
    if tuple(array.shape) != tuple(shape):
        raise WeightMismatchError(
            f"tensor {name!r} has shape {tuple(array.shape)}, but the model config implies {shape}")
    array = np.asarray(array)
    if transpose:
        array = array.T
    # Cast on the host: the device never holds a float32 copy of a bfloat16 model.
    return jnp.asarray(np.ascontiguousarray(array.astype(jnp.dtype(dtype), copy=False)))
