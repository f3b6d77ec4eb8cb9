"""What the safetensors format readers share: fetching a module's tensors with errors that
name them, checking their shapes, unpacking integers packed into int32 words, and matching
module names against a config's patterns ("re:" regexes or exact names). Imports nothing of
ours but nothing either from vllm or torch."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np


def module_name(prefix: str) -> str:
    """"model.layers.0.mlp.up_proj." -> "model.layers.0.mlp.up_proj"."""
    return prefix[:-1] if prefix.endswith(".") else prefix


def fetch(tensors: Mapping[str, np.ndarray], name: str, method: str) -> np.ndarray:
    """The tensor `name`, or a ValueError naming it (a quantized module missing a part)."""
    if name not in tensors:
        raise ValueError(f"{method} checkpoint: tensor {name!r} is missing (the module is "
                         "quantized according to the quantization_config)")
    return np.asarray(tensors[name])


def expect_shape(array: np.ndarray, expected: Sequence[int], name: str, why: str = "") -> None:
    """Raise a ValueError naming the tensor `name` unless `array` has shape `expected`."""
    if tuple(array.shape) != tuple(int(e) for e in expected):
        raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}, expected "
                         f"{tuple(int(e) for e in expected)}{' ' + why if why else ''}")


def expect_dtype(array: np.ndarray, dtypes: Sequence, name: str) -> None:
    if not any(array.dtype == np.dtype(d) for d in dtypes):
        raise ValueError(f"tensor {name!r} has dtype {array.dtype}, expected one of "
                         f"{[str(np.dtype(d)) for d in dtypes]}")


def unpack_int32(packed: np.ndarray, bits: int, axis: int,
                 field_order: Sequence[int] | None = None) -> np.ndarray:
    """Unsigned `bits`-wide fields (bits <= 8) of int32 words, spread along `axis` (uint8).

    Word p of `packed` along `axis` holds the elements n*p .. n*p + n-1 (n = 32 // bits);
    field j (bits j*bits .. j*bits + bits-1, least significant first) holds element
    n*p + field_order[j] (field_order defaults to 0, 1, ..., n-1). One field at a time, so
    that a large weight needs no temporary bigger than its packed words."""
    per_word = 32 // bits
    order = range(per_word) if field_order is None else field_order
    words = np.moveaxis(np.asarray(packed).view(np.uint32), axis, -1)
    out = np.empty((*words.shape[:-1], words.shape[-1], per_word), np.uint8)
    mask = np.uint32((1 << bits) - 1)
    for field, element in enumerate(order):
        out[..., element] = (words >> np.uint32(bits * field)) & mask
    out = out.reshape(*words.shape[:-1], words.shape[-1] * per_word)
    return np.moveaxis(out, -1, axis)


def matches(name: str, pattern: str) -> bool:
    """vLLM's matching of module names against config patterns: "re:<regex>" matches from
    the start of the name (re.match), anything else must equal the name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


def as_float32(array: np.ndarray, name: str) -> np.ndarray:
    """A scale tensor (f16, bf16 or f32 in checkpoints) as float32."""
    if array.dtype.kind in "iub":
        raise ValueError(f"tensor {name!r} has dtype {array.dtype}, expected a float scale")
    return np.asarray(array, dtype=np.float32)
