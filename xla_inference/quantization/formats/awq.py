"""AWQ checkpoints (AutoAWQ's "gemm" layout; quant_method "awq") read into GroupQuant.

Per quantized linear module, with in/out the logical [out, in] weight's sizes and g the
group size (-1: one group per row):
    qweight  int32 [in, out/8]     4-bit q, packed along the output dimension;
                                   field j (bits 4j..4j+3) of word c holds column
                                   8c + (0, 2, 4, 6, 1, 3, 5, 7)[j] (AWQ's interleave)
    qzeros   int32 [in/g, out/8]   4-bit zero points z, packed like qweight
    scales   f16   [in/g, out]
    w[o, k] = (q[k, o] - z[k // g, o]) * s[k // g, o]
which is GroupQuant INT4 with values q (transposed) and offsets -z*s.

Refused: other versions ("gemv" packs differently), zero_point false, bits other than 4.
Modules named in modules_to_not_convert (matched as substrings of the module name, as vLLM
does) and modules without a qweight tensor are left unquantized (read_weight -> None)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from xla_inference.quantization.formats.common import (
    as_float32, expect_dtype, expect_shape, fetch, module_name, unpack_int32)
from xla_inference.quantization.groups import INT4, GroupQuant

METHOD = "awq"
SUPPORTED = ('awq: version "gemm", 4-bit, zero_point true, any group size dividing the '
             "input size (or -1, per channel), modules_to_not_convert")
AWQ_FIELD_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SUFFIXES = ("qweight", "qzeros", "scales")


def _refuse(what: str) -> ValueError:
    return ValueError(f"AWQ checkpoint: {what} is not supported; supported: {SUPPORTED}")


class AwqReader:
    """Validates an AWQ quantization_config at construction; read_weight() per module."""

    method = METHOD

    def __init__(self, config: Mapping):
        self.bits = int(_first(config, ("bits", "w_bit"), 4))
        self.group_size = int(_first(config, ("group_size", "q_group_size"), 128))
        self.zero_point = bool(config.get("zero_point", True))
        self.version = str(config.get("version") or "gemm").lower()
        self.skip = list(config.get("modules_to_not_convert") or [])
        if self.version != "gemm":
            raise _refuse(f"version {self.version!r}")
        if self.bits != 4:
            raise _refuse(f"bits={self.bits}")
        if not self.zero_point:
            raise _refuse("zero_point=false (symmetric AWQ)")
        if self.group_size == 0 or self.group_size < -1:
            raise _refuse(f"group_size={self.group_size}")

    def describe(self) -> str:
        return f"AWQ gemm 4-bit, group size {self.group_size}, zero points"

    def owns(self, name: str) -> bool:
        """Whether checkpoint tensor `name` is part of a quantized module's encoding."""
        return name.rsplit(".", 1)[-1] in _SUFFIXES

    def read_weight(self, tensors: Mapping[str, np.ndarray], prefix: str,
                    shape: tuple[int, int] | None = None) -> GroupQuant | None:
        """The module's GroupQuant; `shape` is the logical [out, in] the model expects (None:
        taken from qweight)."""
        name = module_name(prefix)
        if any(skip in name for skip in self.skip) or prefix + "qweight" not in tensors:
            return None
        qweight_shape = np.shape(tensors[prefix + "qweight"])
        if shape is None and len(qweight_shape) == 2:
            shape = (qweight_shape[1] * 8, qweight_shape[0])
        out, inp = (int(s) for s in shape)
        group = inp if self.group_size == -1 else self.group_size
        if out % 8 or inp % group:
            raise ValueError(f"AWQ checkpoint: module {name!r} of shape [{out}, {inp}]: the "
                             f"output size must be a multiple of 8 and the group size {group} "
                             "must divide the input size")
        groups = inp // group
        qweight, qzeros, scales = (fetch(tensors, prefix + s, METHOD) for s in _SUFFIXES)
        expect_dtype(qweight, [np.int32, np.uint32], prefix + "qweight")
        expect_dtype(qzeros, [np.int32, np.uint32], prefix + "qzeros")
        expect_shape(qweight, (inp, out // 8), prefix + "qweight", f"for [{out}, {inp}]")
        expect_shape(qzeros, (groups, out // 8), prefix + "qzeros", f"(group size {group})")
        expect_shape(scales, (groups, out), prefix + "scales", f"(group size {group})")
        values = unpack_int32(qweight, 4, axis=1, field_order=AWQ_FIELD_ORDER).T
        zeros = unpack_int32(qzeros, 4, axis=1, field_order=AWQ_FIELD_ORDER).T
        scale = as_float32(scales, prefix + "scales").T
        return GroupQuant(values=np.ascontiguousarray(values, dtype=np.uint8),
                          scales=np.ascontiguousarray(scale),
                          offsets=-(zeros.astype(np.float32) * scale),
                          kind=INT4, group_size=group)


def _first(config: Mapping, keys: tuple[str, ...], default):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default
