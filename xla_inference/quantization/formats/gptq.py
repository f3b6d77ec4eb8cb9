"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout; quant_method "gptq") read into GroupQuant.

Per quantized linear module, with in/out the logical [out, in] weight's sizes, b the bits
(4 or 8), n = 32 / b and g the group size (-1: one group per row):
    qweight  int32 [in/n, out]    q packed along the input dimension: field i (bits
                                  b*i..b*i+b-1, least significant first) of row r holds
                                  input row n*r + i
    qzeros   int32 [in/g, out/n]  zero points packed along the output dimension
    scales   f16   [in/g, out]
    g_idx    int32 [in]           group of each input row (optional)
    w[o, k] = (q[k, o] - z[g_idx[k], o]) * s[g_idx[k], o]
Symmetric checkpoints (sym true) have z = 2^(b-1) (8 or 128) whatever qzeros holds, as vLLM
reads them. Asymmetric ones store z - 1 in qzeros in the original format
(checkpoint_format "gptq", AutoGPTQ's) and z itself in GPTQModel's "gptq_v2".
4-bit: GroupQuant INT4, values q, offsets -z*s. 8-bit: INT8, values q - 128 (int8),
offsets (128 - z)*s, none when symmetric.

Activation order (desc_act true) is read only where g_idx is the trivial k // g (then it
changes nothing); any other g_idx is refused, as vLLM does. GPTQModel's per-module
`dynamic` rules are honoured: "-:regex" leaves matching modules unquantized, "+:regex" (or a
bare regex) overrides bits, group_size, sym and desc_act for them. Modules without a qweight
tensor, or outside modules_in_block_to_quantize when it is given, are unquantized (None)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from xla_inference.quantization.formats.common import (
    as_float32, expect_dtype, expect_shape, fetch, module_name, unpack_int32)
from xla_inference.quantization.groups import INT4, INT8, GroupQuant

METHOD = "gptq"
SUPPORTED = ("gptq: 4- or 8-bit, symmetric or asymmetric (checkpoint_format gptq or "
             "gptq_v2), any group size dividing the input size (or -1), desc_act false (or "
             "true with a trivial g_idx), GPTQModel dynamic rules")
_FORMATS = ("gptq", "gptq_v2")
_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def _refuse(what: str) -> ValueError:
    return ValueError(f"GPTQ checkpoint: {what} is not supported; supported: {SUPPORTED}")


class _Settings:
    """The quantization settings of one module (the config's, or a dynamic rule's)."""

    def __init__(self, config: Mapping, where: str = ""):
        self.bits = int(config.get("bits", 4))
        self.group_size = int(config.get("group_size", 128))
        self.sym = bool(config.get("sym", True))
        self.desc_act = bool(config.get("desc_act", False))
        if self.bits not in (4, 8):
            raise _refuse(f"bits={self.bits}{where}")
        if self.group_size == 0 or self.group_size < -1:
            raise _refuse(f"group_size={self.group_size}{where}")

    def overridden(self, rule: Mapping, where: str) -> _Settings:
        merged = dict(bits=self.bits, group_size=self.group_size, sym=self.sym,
                      desc_act=self.desc_act)
        merged.update({k: v for k, v in rule.items() if k in merged})
        return _Settings(merged, where)


class GptqReader:
    """Validates a GPTQ quantization_config at construction; read_weight() per module."""

    method = METHOD

    def __init__(self, config: Mapping):
        self.settings = _Settings(config)
        self.format = str(config.get("checkpoint_format") or "gptq").lower()
        if self.format not in _FORMATS:
            raise _refuse(f"checkpoint_format {self.format!r}")
        if config.get("is_marlin_format"):
            raise _refuse("is_marlin_format=true (Marlin-repacked weights)")
        self.dynamic = dict(config.get("dynamic") or {})
        for pattern, rule in self.dynamic.items():  # validate every rule up front
            if not pattern.startswith("-:"):
                self.settings.overridden(rule or {}, f" (dynamic rule {pattern!r})")
        self.quantized_modules = _flatten(config.get("modules_in_block_to_quantize") or [])

    def describe(self) -> str:
        s = self.settings
        return (f"GPTQ {s.bits}-bit, group size {s.group_size}, "
                f"{'symmetric' if s.sym else 'asymmetric (' + self.format + ')'}")

    def owns(self, name: str) -> bool:
        """Whether checkpoint tensor `name` is part of a quantized module's encoding."""
        return name.rsplit(".", 1)[-1] in _SUFFIXES

    def _module_settings(self, name: str) -> _Settings | None:
        """The settings for module `name`, None when the dynamic rules skip it (first
        matching rule wins, as in vLLM)."""
        for pattern, rule in self.dynamic.items():
            if pattern.startswith("-:"):
                if re.match(pattern[2:], name):
                    return None
            elif re.match(pattern.removeprefix("+:"), name):
                return self.settings.overridden(rule or {}, f" (dynamic rule {pattern!r})")
        return self.settings

    def read_weight(self, tensors: Mapping[str, np.ndarray], prefix: str,
                    shape: tuple[int, int] | None = None) -> GroupQuant | None:
        """The module's GroupQuant; `shape` is the logical [out, in] the model expects (None:
        taken from qweight)."""
        name = module_name(prefix)
        if prefix + "qweight" not in tensors:
            return None
        if self.quantized_modules and not any(m in name for m in self.quantized_modules):
            return None
        settings = self._module_settings(name)
        if settings is None:
            return None
        if shape is None:
            packed_in, out = np.shape(tensors[prefix + "qweight"])
            shape = (out, packed_in * 32 // settings.bits)
        return self._read(tensors, prefix, name, settings, tuple(int(s) for s in shape))

    def _read(self, tensors, prefix, name, s: _Settings, shape) -> GroupQuant:
        out, inp = shape
        per_word = 32 // s.bits
        group = inp if s.group_size == -1 else s.group_size
        if inp % per_word or out % per_word or inp % group:
            raise ValueError(f"GPTQ checkpoint: module {name!r} of shape [{out}, {inp}]: "
                             f"sizes must be multiples of {per_word} and the group size "
                             f"{group} must divide the input size")
        groups = inp // group
        qweight = fetch(tensors, prefix + "qweight", METHOD)
        scales = fetch(tensors, prefix + "scales", METHOD)
        expect_dtype(qweight, [np.int32, np.uint32], prefix + "qweight")
        expect_shape(qweight, (inp // per_word, out), prefix + "qweight",
                     f"for [{out}, {inp}] at {s.bits} bits")
        expect_shape(scales, (groups, out), prefix + "scales", f"(group size {group})")
        self._check_g_idx(tensors, prefix, name, inp, group)
        q = unpack_int32(qweight, s.bits, axis=0).T  # [out, in]
        scale = np.ascontiguousarray(as_float32(scales, prefix + "scales").T)  # [out, G]
        zeros = self._zero_points(tensors, prefix, s, out, groups)  # [out, G] or scalar
        if s.bits == 4:
            return GroupQuant(values=np.ascontiguousarray(q, dtype=np.uint8), scales=scale,
                              offsets=-(zeros * scale), kind=INT4, group_size=group)
        values = np.ascontiguousarray((q ^ np.uint8(0x80)).view(np.int8))  # q - 128
        offsets = None if s.sym else (128.0 - zeros) * scale
        return GroupQuant(values=values, scales=scale, offsets=offsets, kind=INT8,
                          group_size=group)

    def _zero_points(self, tensors, prefix, s: _Settings, out: int, groups: int):
        """z as float32 [out, G] (or the symmetric midpoint as a scalar)."""
        if s.sym:
            return np.float32(1 << (s.bits - 1))
        qzeros = fetch(tensors, prefix + "qzeros", METHOD)
        expect_dtype(qzeros, [np.int32, np.uint32], prefix + "qzeros")
        expect_shape(qzeros, (groups, out * s.bits // 32), prefix + "qzeros",
                     f"at {s.bits} bits")
        stored = unpack_int32(qzeros, s.bits, axis=1).T.astype(np.float32)
        # The original format saved z - 1 (so a zero point of 0 wraps to 2^b - 1 and reads
        # back as 2^b, as AutoGPTQ's own kernels read it).
        return stored + 1 if self.format == "gptq" else stored

    @staticmethod
    def _check_g_idx(tensors, prefix, name, inp: int, group: int) -> None:
        if prefix + "g_idx" not in tensors:
            return
        g_idx = np.asarray(tensors[prefix + "g_idx"])
        expect_shape(g_idx, (inp,), prefix + "g_idx")
        if not np.array_equal(g_idx.astype(np.int64), np.arange(inp) // group):
            raise _refuse(f"module {name!r}: activation reordering (desc_act with a g_idx "
                          f"other than k // {group})")


def _flatten(items) -> list[str]:
    """modules_in_block_to_quantize is a list of names or a list of lists of names."""
    flat = []
    for item in items:
        flat.extend(_flatten(item) if isinstance(item, (list, tuple)) else [item])
    return flat
