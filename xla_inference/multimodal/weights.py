"""Reading a vision tower's (and its projector's) weights as plain float32: the towers are
served unquantized, so a checkpoint that quantized them is refused, naming the tower,
rather than its integer or FP8 values being cast to float without their scales (the text
model's loader refuses the same for its own tensors: loading/params._checked)."""

from collections.abc import Callable, Mapping

import numpy as np

from xla_inference.loading.params import (WeightMismatchError, holds_quantized_values,
                                          quantized_tensor)

# The last name component of a quantized weight's companions: compressed-tensors / FP8
# (weight_scale, weight_packed, ...), GPTQ and AWQ (qweight, qzeros, scales, g_idx).
_QUANTIZATION_COMPANIONS = frozenset((
    "weight_scale", "weight_scale_inv", "weight_packed", "weight_zero_point",
    "weight_global_scale", "weight_shape", "input_scale", "qweight", "qzeros", "scales", "g_idx"))


def tower_prefix(tensors: Mapping, prefixes: tuple[str, ...], probe: str, tower: str) -> str:
    """The first of `prefixes` under which the checkpoint holds `probe` (checkpoints name a
    tower's and projector's tensors differently: the Hub's, transformers' module tree)."""
    for prefix in prefixes:
        if prefix + probe in tensors:
            return prefix
    raise KeyError(f"{tower}: no tensor named {probe!r} under any of {prefixes}")


def _refusal(tower: str, what: str) -> WeightMismatchError:
    return WeightMismatchError(
        f"{tower}: {what}; the vision tower and projector are served unquantized, so a "
        "checkpoint that quantized them is refused rather than read as plain numbers")


def float32_reader(tensors: Mapping[str, np.ndarray], prefixes: tuple[str, ...],
                   tower: str) -> Callable[[str], np.ndarray]:
    """get(name) -> the tensor as float32. First refuses any quantization companion under
    `prefixes` (the tower's and projector's, as this checkpoint names them); get refuses a
    tensor held as integers or FP8, or that the mapping reads as a quantized weight."""
    for name in tensors:
        if name.startswith(prefixes) and name.rsplit(".", 1)[-1] in _QUANTIZATION_COMPANIONS:
            raise _refusal(tower, f"the checkpoint holds {name!r}, a quantized weight's part")

    def get(name: str) -> np.ndarray:
        if quantized_tensor(tensors, name) is not None:
            raise _refusal(tower, f"{name!r} is quantized")
        array = tensors[name]
        if holds_quantized_values(array):
            raise _refusal(tower, f"{name!r} holds quantized values ({np.dtype(array.dtype)})")
        return np.asarray(array, dtype=np.float32)

    return get
