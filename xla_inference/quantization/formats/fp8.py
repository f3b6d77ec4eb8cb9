"""FP8 checkpoints with `quant_method: fp8` (DeepSeek-V3, Kimi-K2 and other block-FP8
exports; AutoFP8's per-tensor ones): each quantized linear has `weight` (float8_e4m3fn,
[out, in]) and either `weight_scale_inv` [ceil(out/B0), ceil(in/B1)] (one scale per
B0 x B1 block, `weight_block_size` [B0, B1], usually 128 x 128) or `weight_scale` (one per
tensor, or one per output channel). The weight is value * scale; "_inv" in the name is
historical (DeepSeek's), the tensor multiplies.

Activations: vLLM quantizes them dynamically per token (or per 128-element group for
blocks) on FP8 hardware; here they stay in floating point and the FP8 weight is dequantized
inside the product (what vLLM does on GPUs without FP8 units, its weight-only fallback).
A static activation scheme (a calibrated `input_scale`) is refused: serving it weight-only
would silently differ from what the checkpoint was calibrated for."""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np

from xla_inference.quantization.groups import FP8, GroupQuant

class Fp8Reader:
    """read_weight(tensors, prefix, shape) -> GroupQuant | None for a `quant_method: fp8`
    checkpoint."""

    METHOD = "fp8"

    def __init__(self, config: Mapping):
        scheme = config.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(f"fp8 checkpoint with activation_scheme {scheme!r} is not supported "
                             "(supported: 'dynamic'; static input scales are not applied)")
        block = config.get("weight_block_size")
        if block is not None and (len(block) != 2 or min(block) <= 0):
            raise ValueError(f"fp8 checkpoint: weight_block_size {block!r} is not two positive "
                             "sizes")
        self.block = tuple(block) if block is not None else None
        self.ignored = tuple(config.get("ignored_layers") or config.get("modules_to_not_convert")
                             or ())

    def read_weight(self, tensors: Mapping, prefix: str, shape=None) -> GroupQuant | None:
        name = prefix + "weight"
        if name not in tensors or any(prefix.rstrip(".").endswith(i) for i in self.ignored):
            return None
        values = np.asarray(tensors[name])
        if values.dtype != ml_dtypes.float8_e4m3fn:
            return None  # left unquantized by the exporter
        out, inp = values.shape
        if self.block is not None:
            return self._block_weight(tensors, prefix, values)
        scale_name = prefix + "weight_scale"
        if scale_name not in tensors:
            raise ValueError(f"fp8 tensor {name!r} has no {scale_name!r}")
        scale = np.asarray(tensors[scale_name], np.float32)
        if scale.size == 1:
            scales = np.full((out, 1), float(scale.reshape(())), np.float32)
        elif scale.size == out:
            scales = scale.reshape(out, 1)
        else:
            raise ValueError(f"tensor {scale_name!r} has shape {scale.shape}: expected one scale "
                             f"per tensor or per output channel ({out}) of {name!r}")
        return GroupQuant(values, scales, None, FP8, group_size=inp)

    def _block_weight(self, tensors: Mapping, prefix: str, values: np.ndarray) -> GroupQuant:
        out, inp = values.shape
        rows, cols = self.block
        scale_name = prefix + "weight_scale_inv"
        if scale_name not in tensors:
            raise ValueError(f"fp8 block checkpoint: {prefix + 'weight'!r} has no {scale_name!r}")
        scale = np.asarray(tensors[scale_name], np.float32)
        expected = (-(-out // rows), -(-inp // cols))
        if scale.shape != expected:
            raise ValueError(f"tensor {scale_name!r} has shape {scale.shape}, expected {expected} "
                             f"for a [{out}, {inp}] weight in {rows} x {cols} blocks")
        if inp % cols:
            raise ValueError(f"{prefix + 'weight'!r}: input size {inp} is not a multiple of the "
                             f"fp8 block width {cols}")
        scales = np.repeat(scale, rows, axis=0)[:out]  # each row its block-row's scales
        return GroupQuant(values, scales, None, FP8, group_size=cols)
