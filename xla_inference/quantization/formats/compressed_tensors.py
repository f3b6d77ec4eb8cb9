"""compressed-tensors checkpoints (llm-compressor's output; quant_method
"compressed-tensors") read into GroupQuant.

The quantization_config holds config_groups, each {targets, weights, input_activations,
output_activations, format}, plus a global format and an ignore list. A module (HF name)
takes the first group with a matching target: "Linear" (the class: every linear module),
"re:<regex>" (re.match on the name) or an exact name; names matching `ignore` are left
unquantized (read_weight -> None), and so are matched modules without quantized tensors
(norms and embeddings, which "Linear" cannot tell apart by name, or modules the exporter
skipped). Supported schemes, as vLLM picks them:

- W8A8 int8 (format int-quantized or naive-quantized): `weight` int8 [out, in],
  `weight_scale` [out, 1] (per channel) or [1] / [] (per tensor); symmetric weights; input
  activations quantized per token, dynamically, symmetrically to int8 -> GroupQuant INT8
  with activations INT8_ACTIVATIONS, one group per row.
- FP8 (format float-quantized or naive-quantized): `weight` float8_e4m3fn [out, in],
  `weight_scale` per tensor, per channel [out, 1] or per block [ceil(out/bo), ceil(in/bi)]
  (strategy "block", block_structure [bo, bi], usually 128 x 128); input activations
  dynamic FP8 or none -> GroupQuant FP8, activations FLOAT. We run FP8 weight-only (the
  activations stay in floating point), as vLLM's Marlin fallback does on hardware without
  FP8 matmuls; the dynamic activation quantization is dropped.
- WNA16 (format pack-quantized, no input activations): `weight_packed` int32
  [out, ceil(in*b/32)] (b = 4 or 8 bits; value i of a word in bits b*i.., least significant
  first, stored as q + 2^(b-1)), `weight_shape` [out, in], `weight_scale` [out, in/g] per
  group or [out, 1] per channel, and when asymmetric `weight_zero_point` int32
  [ceil(out*b/32), G] packed the same way along the output dimension ->
  4-bit: GroupQuant INT4, values q + 8, offsets -(zp + 8)*s;
  8-bit: INT8, values q, offsets -zp*s (none when symmetric).

Refused, naming what was found: static input activations (an input_scale), asymmetric
activations, activation reordering (actorder group / weight_g_idx), NVFP4, MXFP4, MXFP8,
W4A8 and other mixed schemes, output activations, 2:4 sparsity, transforms, attention
quantization. A kv_cache_scheme (FP8 KV cache scales, per tensor) is served by
quantization/kv_cache_scales.py, also in a checkpoint whose weights are not quantized
(no config_groups)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from xla_inference.quantization.formats.common import (
    as_float32, expect_dtype, expect_shape, fetch, matches, module_name, unpack_int32)
from xla_inference.quantization.groups import (
    FP8, INT4, INT8, INT8_ACTIVATIONS, GroupQuant)
from xla_inference.quantization.kv_cache_scales import declares_kv_cache_scales

METHOD = "compressed-tensors"
SUPPORTED = ("compressed-tensors: W8A8 int8 (int-quantized: int8 weights per channel or per "
             "tensor, dynamic per-token symmetric int8 activations); FP8 (float-quantized: "
             "weights per tensor, per channel or in blocks, dynamic or no activation "
             "quantization; run weight-only); WNA16 (pack-quantized 4- or 8-bit weights per "
             "group or per channel, symmetric or asymmetric, no activation quantization)")
W8A8_INT8, FP8_WEIGHTS, WNA16 = "W8A8-int8", "FP8", "WNA16"
_SUFFIXES = ("weight_scale", "weight_zero_point", "weight_packed", "weight_shape",
             "input_scale", "input_zero_point")
_FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


def _refuse(what: str) -> ValueError:
    return ValueError(f"compressed-tensors checkpoint: {what} is not supported; "
                      f"supported: {SUPPORTED}")


class _Args:
    """One side (weights or input activations) of a config group, with compressed-tensors'
    defaults and its inference of the strategy."""

    def __init__(self, args: Mapping):
        self.num_bits = int(args.get("num_bits", 8))
        self.type = str(args.get("type", "int")).lower()
        self.symmetric = bool(args.get("symmetric", True))
        self.group_size = args.get("group_size")
        self.block_structure = args.get("block_structure")
        self.dynamic = args.get("dynamic", False)
        self.actorder = args.get("actorder")
        strategy = args.get("strategy")
        if strategy is None:
            strategy = ("tensor" if self.group_size is None
                        else "channel" if self.group_size == -1 else "group")
        self.strategy = str(strategy).lower()

    def __str__(self) -> str:
        extra = (f" group_size={self.group_size}" if self.strategy == "group"
                 else f" block_structure={self.block_structure}" if self.strategy == "block"
                 else "")
        return (f"{self.type} {self.num_bits}-bit {self.strategy}{extra}"
                f"{'' if self.symmetric else ' asymmetric'}"
                f"{' dynamic' if self.dynamic else ' static'}")


class _Scheme:
    """A config group resolved to one of the supported schemes (or refused)."""

    def __init__(self, name: str, group: Mapping, global_format: str | None):
        self.name = name
        self.targets = list(group.get("targets") or [])
        self.format = str(group.get("format") or global_format or "").lower()
        if group.get("weights") is None:
            raise _refuse(f"config group {name!r} without weight quantization")
        self.weights = _Args(group["weights"])
        acts = group.get("input_activations")
        self.inputs = _Args(acts) if acts else None
        if group.get("output_activations"):
            raise _refuse(f"config group {name!r}: output activation quantization")
        self.kind = self._classify()

    def _found(self) -> str:
        inputs = str(self.inputs) if self.inputs else "none"
        known = _scheme_name(self.weights, self.inputs, self.format)
        return (f"config group {self.name!r}{' (' + known + ')' if known else ''} (format "
                f"{self.format or 'unset'}, weights {self.weights}, input activations "
                f"{inputs})")

    def _classify(self) -> str:
        w, x = self.weights, self.inputs
        if w.actorder in ("group", "dynamic", True):
            raise _refuse(f"{self._found()}: activation reordering (actorder={w.actorder!r})")
        if w.dynamic:
            raise _refuse(f"{self._found()}: dynamic weight quantization")
        if x is not None:
            self._check_inputs(x)
        if w.type == "float" and w.num_bits == 8 and self.format in (
                "float-quantized", "naive-quantized"):
            if w.strategy in ("tensor", "channel", "block") and w.symmetric and (
                    x is None or x.type == "float"):
                return FP8_WEIGHTS
        elif w.type == "int" and self.format in ("int-quantized", "naive-quantized"):
            if (w.num_bits == 8 and w.strategy in ("tensor", "channel") and w.symmetric
                    and x is not None and x.type == "int" and x.num_bits == 8
                    and x.strategy == "token"):
                return W8A8_INT8
        elif w.type == "int" and self.format == "pack-quantized" and x is None:
            if w.num_bits in (4, 8) and w.strategy in ("group", "channel"):
                return WNA16
        raise _refuse(self._found())

    def _check_inputs(self, x: _Args) -> None:
        if not x.dynamic:
            raise _refuse(f"{self._found()}: static input activation scales (input_scale)")
        if not x.symmetric:
            raise _refuse(f"{self._found()}: asymmetric input activations")
        if x.num_bits != 8:
            raise _refuse(self._found())

    def matches(self, name: str) -> bool:
        return any(t == "Linear" or t.endswith(".Linear") or matches(name, t)
                   for t in self.targets)


class CompressedTensorsReader:
    """Validates a compressed-tensors quantization_config at construction; read_weight()
    per module."""

    method = METHOD

    def __init__(self, config: Mapping):
        _refuse_extras(config)
        self.ignore = list(config.get("ignore") or [])
        groups = config.get("config_groups") or {}
        if not groups and not declares_kv_cache_scales(config):
            raise _refuse("a quantization_config without config_groups")
        self.schemes = []
        for name, group in groups.items():
            targets = list(group.get("targets") or [])
            if targets and all(t.endswith("Attention") for t in targets):
                raise _refuse(f"config group {name!r}: attention quantization ({targets})")
            self.schemes.append(_Scheme(name, group, config.get("format")))

    def describe(self) -> str:
        return "compressed-tensors " + ", ".join(
            f"{s.name}: {s.kind} {s.weights}" for s in self.schemes)

    def owns(self, name: str) -> bool:
        """Whether checkpoint tensor `name` is part of a quantized module's encoding (the
        int8/FP8 `weight` itself is not: it keeps the plain weight's name)."""
        return name.rsplit(".", 1)[-1] in _SUFFIXES

    def scheme_for(self, name: str) -> _Scheme | None:
        if any(matches(name, pattern) for pattern in self.ignore):
            return None
        return next((s for s in self.schemes if s.matches(name)), None)

    def read_weight(self, tensors: Mapping[str, np.ndarray], prefix: str,
                    shape: tuple[int, int] | None = None) -> GroupQuant | None:
        """The module's GroupQuant; `shape` is the logical [out, in] the model expects (None:
        taken from `weight` or `weight_shape`)."""
        scheme = self.scheme_for(module_name(prefix))
        if scheme is None or not _holds_quantized(tensors, prefix, scheme):
            return None
        if shape is None:
            shape = _stored_shape(tensors, prefix, scheme)
        shape = tuple(int(s) for s in shape)
        if scheme.kind == WNA16:
            return _read_packed(tensors, prefix, shape, scheme.weights)
        return _read_8bit(tensors, prefix, shape, scheme)


def _scheme_name(w: _Args, x: _Args | None, fmt: str) -> str:
    """The usual name of a scheme we refuse, so that the message says what it is."""
    if w.type == "float" and w.num_bits == 4:
        return "NVFP4" if w.strategy == "tensor_group" or "nvfp4" in fmt else "MXFP4"
    if "mxfp8" in fmt:
        return "MXFP8"
    if w.type == "int" and x is not None and w.num_bits < 8:
        return f"W{w.num_bits}A{x.num_bits} ({x.type} activations)"
    return ""


def _holds_quantized(tensors, prefix: str, scheme: _Scheme) -> bool:
    """Whether the module at `prefix` was compressed. A "Linear" target also matches the
    names of norms and embeddings (the loader asks about every weight), and exporters leave
    some matched modules alone: a float `weight` without a scale is such a module. An
    int8/FP8 weight without its scale is not: read_weight then names the missing scale."""
    if scheme.kind == WNA16:
        return prefix + "weight_packed" in tensors
    if prefix + "weight" not in tensors:
        return False
    dtype = np.dtype(tensors[prefix + "weight"].dtype)
    quantized_values = dtype.itemsize == 1  # int8, uint8 or float8_e4m3fn
    return quantized_values or prefix + "weight_scale" in tensors


def _stored_shape(tensors, prefix: str, scheme: _Scheme) -> tuple[int, int]:
    """The logical [out, in] as the checkpoint records it."""
    if scheme.kind == WNA16:
        stored = fetch(tensors, prefix + "weight_shape", METHOD).reshape(-1)
        return int(stored[0]), int(stored[1])
    return tuple(fetch(tensors, prefix + "weight", METHOD).shape)


def _refuse_extras(config: Mapping) -> None:
    """What a config can carry beside its config groups that we cannot honour."""
    declares_kv_cache_scales(config)  # raises for a KV cache scheme we do not serve
    sparsity = config.get("sparsity_config") or {}
    if sparsity and str(sparsity.get("format", "dense")).lower() != "dense":
        raise _refuse(f"sparsity (format {sparsity.get('format')}, structure "
                      f"{sparsity.get('sparsity_structure')}; 2:4 and other sparse weights)")
    if config.get("transform_config"):
        raise _refuse("transform_config (rotations such as QuIP or SpinQuant)")
    status = config.get("quantization_status")
    if status is not None and str(status).lower() != "compressed":
        raise _refuse(f"quantization_status {status!r} (weights not compressed)")


def _read_8bit(tensors, prefix: str, shape, scheme: _Scheme) -> GroupQuant:
    """W8A8 int8 and FP8: an unpacked [out, in] weight and its scale."""
    out, inp = shape
    weight = fetch(tensors, prefix + "weight", METHOD)
    if scheme.kind == FP8_WEIGHTS and weight.dtype == np.uint8:
        weight = weight.view(_FP8)  # a reader that hands FP8 bytes over as uint8
    expect_dtype(weight, [_FP8] if scheme.kind == FP8_WEIGHTS else [np.int8], prefix + "weight")
    expect_shape(weight, shape, prefix + "weight")
    scale_name = prefix + "weight_scale"
    raw = as_float32(fetch(tensors, scale_name, METHOD), scale_name)
    w = scheme.weights
    if w.strategy == "block":
        scales, group = _block_scales(raw, shape, w.block_structure, scale_name)
    elif w.strategy == "channel":
        if raw.shape not in ((out, 1), (out,)):
            expect_shape(raw, (out, 1), scale_name, "(per-channel scale)")
        scales, group = raw.reshape(out, 1), inp
    else:
        if raw.size != 1:
            expect_shape(raw, (1,), scale_name, "(per-tensor scale)")
        scales, group = np.full((out, 1), raw.reshape(()), np.float32), inp
    if scheme.kind == FP8_WEIGHTS:
        return GroupQuant(values=weight, scales=scales, offsets=None, kind=FP8,
                          group_size=group)
    return GroupQuant(values=weight, scales=scales, offsets=None, kind=INT8, group_size=group,
                      activations=INT8_ACTIVATIONS)


def _block_scales(raw: np.ndarray, shape, block, name: str) -> tuple[np.ndarray, int]:
    """Per-block scales [ceil(out/bo), ceil(in/bi)] as GroupQuant scales [out, in/gs] with
    gs = gcd(in, bi): each block's scale repeated over its rows and its groups (a partial
    last block, where bi does not divide in, takes groups of the common divisor)."""
    out, inp = shape
    if not block or len(block) != 2:
        raise ValueError(f"tensor {name!r}: block strategy without a [rows, cols] "
                         f"block_structure (got {block})")
    rows, cols = (int(b) for b in block)
    expect_shape(raw, (math.ceil(out / rows), math.ceil(inp / cols)), name,
                 f"(blocks of {rows} x {cols})")
    group = math.gcd(inp, cols)
    block_of_group = (np.arange(inp // group) * group) // cols
    return np.ascontiguousarray(raw[np.arange(out) // rows][:, block_of_group]), group


def _read_packed(tensors, prefix: str, shape, w: _Args) -> GroupQuant:
    """WNA16 pack-quantized: int32 words along the input dimension (zero points along the
    output dimension), each value stored with 2^(bits-1) added."""
    out, inp = shape
    bits = w.num_bits
    group = inp if w.strategy == "channel" else int(w.group_size)
    if inp % group:
        raise ValueError(f"compressed-tensors checkpoint: module {prefix[:-1]!r}: group size "
                         f"{group} does not divide the input size {inp}")
    groups = inp // group
    if prefix + "weight_g_idx" in tensors:
        raise _refuse(f"tensor {prefix + 'weight_g_idx'!r} (activation reordering)")
    if prefix + "weight_shape" in tensors:
        stored = np.asarray(tensors[prefix + "weight_shape"]).reshape(-1)
        if tuple(int(s) for s in stored) != shape:
            raise ValueError(f"tensor {prefix + 'weight_shape'!r} says {tuple(stored)}, the "
                             f"model expects {shape}")
    packed = fetch(tensors, prefix + "weight_packed", METHOD)
    expect_dtype(packed, [np.int32, np.uint32], prefix + "weight_packed")
    expect_shape(packed, (out, math.ceil(inp * bits / 32)), prefix + "weight_packed",
                 f"for [{out}, {inp}] at {bits} bits")
    scale_name = prefix + "weight_scale"
    scales = as_float32(fetch(tensors, scale_name, METHOD), scale_name)
    expect_shape(scales, (out, groups), scale_name, f"(group size {group})")
    stored_q = unpack_int32(packed, bits, axis=1)[:, :inp]  # q + 2^(bits-1)
    midpoint = 1 << (bits - 1)
    if w.symmetric:
        zeros = np.float32(midpoint)  # the stored value of q = 0
    else:
        zp_name = prefix + "weight_zero_point"
        zp = fetch(tensors, zp_name, METHOD)
        expect_dtype(zp, [np.int32, np.uint32], zp_name)
        expect_shape(zp, (math.ceil(out * bits / 32), groups), zp_name,
                     f"(packed along the output dimension, group size {group})")
        zeros = unpack_int32(zp, bits, axis=0)[:out].astype(np.float32)  # zp + 2^(bits-1)
    # w = (q - zp) * s = (stored_q - stored_zp) * s
    if bits == 4:
        return GroupQuant(values=np.ascontiguousarray(stored_q, dtype=np.uint8), scales=scales,
                          offsets=-(zeros * scales), kind=INT4, group_size=group)
    values = (stored_q ^ np.uint8(0x80)).view(np.int8)  # stored - 128 = q
    offsets = None if w.symmetric else (midpoint - zeros) * scales
    return GroupQuant(values=np.ascontiguousarray(values), scales=scales, offsets=offsets,
                      kind=INT8, group_size=group)
