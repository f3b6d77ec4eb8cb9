"""The one form every quantized checkpoint format is read into, on the host: each weight
row split into groups of `group_size` consecutive input elements, each group with a scale
and, optionally, an offset:

    w[o, k] = values[o, k] * scales[o, k // group_size] + offsets[o, k // group_size]

`values` holds one integer (or FP8) per weight, unpacked: uint8 in [0, 15] for 4-bit
formats (a zero point or a signed range becomes the offset: (q - z) * s = q * s - z * s),
int8 for 8-bit ones, float8_e4m3fn for FP8. Per-channel scales are one group per row
(group_size = in), per-tensor ones the same scale in every row, a 2-D block (FP8's
128 x 128) the block's scale repeated over its rows. Every format reader (compressed-tensors,
AWQ, GPTQ, GGUF blocks, online quantization) produces a GroupQuant; quantization/packed.py
lays it out for the device. Imports nothing of ours."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

INT4, INT8, FP8 = "int4", "int8", "fp8"
# Activations: kept in floating point (weight-only, WnA16), or quantized per token to int8
# on the fly, as compressed-tensors' dynamic W8A8 int8 scheme prescribes.
FLOAT_ACTIVATIONS, INT8_ACTIVATIONS = "float", "int8"

_VALUE_DTYPES = {INT4: np.dtype(np.uint8), INT8: np.dtype(np.int8),
                 FP8: np.dtype(ml_dtypes.float8_e4m3fn)}


@dataclasses.dataclass
class GroupQuant:
    values: np.ndarray  # [out, in]: uint8 in [0, 15] (INT4), int8 (INT8) or float8_e4m3fn (FP8)
    scales: np.ndarray  # [out, in // group_size] float32
    offsets: np.ndarray | None  # like scales, or None (symmetric)
    kind: str  # INT4, INT8 or FP8
    group_size: int
    activations: str = FLOAT_ACTIVATIONS
    name: str = "weight"  # the checkpoint tensor, for error messages

    def __post_init__(self):
        self.values = np.asarray(self.values)
        self.scales = np.asarray(self.scales, np.float32)
        if self.offsets is not None:
            self.offsets = np.asarray(self.offsets, np.float32)
        self.check()

    @property
    def shape(self) -> tuple[int, int]:
        """The logical [out, in] shape of the weight."""
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return 2

    def check(self, name: str | None = None) -> None:
        """Raise a ValueError naming the tensor unless values, scales and offsets agree."""
        name = name or self.name
        if self.kind not in _VALUE_DTYPES:
            raise ValueError(f"{name}: unknown quantized kind {self.kind!r}")
        if self.values.ndim != 2 or self.values.dtype != _VALUE_DTYPES[self.kind]:
            raise ValueError(f"{name}: {self.kind} values must be a 2-D "
                             f"{_VALUE_DTYPES[self.kind]} array, got {self.values.dtype} "
                             f"{self.values.shape}")
        out, inp = self.values.shape
        if self.group_size <= 0 or inp % self.group_size:
            raise ValueError(f"{name}: group size {self.group_size} does not divide the input "
                             f"size {inp}")
        groups = (out, inp // self.group_size)
        if self.scales.shape != groups:
            raise ValueError(f"{name}: scales have shape {self.scales.shape}, expected {groups} "
                             f"for a [{out}, {inp}] weight in groups of {self.group_size}")
        if self.offsets is not None and self.offsets.shape != groups:
            raise ValueError(f"{name}: offsets have shape {self.offsets.shape}, expected {groups}")
        if self.kind == INT4 and self.values.size and int(self.values.max()) > 15:
            raise ValueError(f"{name}: 4-bit values above 15")

    def dequantize(self, dtype=np.float64) -> np.ndarray:
        """The [out, in] weight in `dtype` (a reference: tests, and the jnp fallback's host
        copy never uses it)."""
        repeat = lambda a: np.repeat(a.astype(dtype), self.group_size, axis=1)  # noqa: E731
        w = self.values.astype(dtype) * repeat(self.scales)
        return w if self.offsets is None else w + repeat(self.offsets)

    def take_rows(self, rows) -> GroupQuant:
        """The same weight restricted to (or reordered by) `rows` (GGUF's rope row order,
        a fused projection's shard)."""
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return dataclasses.replace(self, values=self.values[rows], scales=self.scales[rows],
                                   offsets=pick(self.offsets))


def regroup(weight: GroupQuant, group_size: int) -> GroupQuant:
    """The same weight with groups of `group_size`, which must divide the current group
    size (each group's scale and offset repeated over its parts): exact, since the formula
    is per element."""
    if weight.group_size % group_size:
        raise ValueError(f"cannot split groups of {weight.group_size} into groups of {group_size}")
    factor = weight.group_size // group_size
    rep = lambda a: None if a is None else np.repeat(a, factor, axis=1)  # noqa: E731
    return dataclasses.replace(weight, scales=rep(weight.scales), offsets=rep(weight.offsets),
                               group_size=group_size)
