"""Readers of quantized safetensors checkpoints: the quantization_config of config.json
names a method, `reader_for` validates it and returns a reader whose
`read_weight(tensors, prefix, shape)` turns one linear module's tensors into a GroupQuant
(None for modules the checkpoint leaves unquantized).

    reader = reader_for(hf_config.get("quantization_config"), vllm_quantization_flag)
    if reader is not None:
        gq = reader.read_weight(tensors, "model.layers.0.self_attn.q_proj.", (out, in))

Every reader also has `method`, `describe()` (one line for logs) and `owns(name)` (whether a
checkpoint tensor is part of a quantized module's encoding: qweight, scales, weight_packed,
weight_scale, ...; the int8/FP8 compressed-tensors `weight` keeps the plain name); the
quant_method "fp8" reader (formats/fp8.py, the lead's) has read_weight only.
Methods we do not read (bitsandbytes, GGUF-in-safetensors, HQQ, MXFP4, ModelOpt, ...) are
refused with a ValueError that lists what is supported."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from xla_inference.quantization.formats import awq, compressed_tensors, fp8, gptq
from xla_inference.quantization.groups import GroupQuant

SUPPORTED_METHODS = (compressed_tensors.METHOD, awq.METHOD, gptq.METHOD, fp8.Fp8Reader.METHOD)
_FP8_SUPPORTED = ("fp8: float8_e4m3fn weights with weight_scale_inv blocks "
                  "(weight_block_size) or a per-tensor / per-channel weight_scale, "
                  "activation_scheme dynamic; run weight-only")
# vLLM's --quantization values that mean reading each method's checkpoints.
_FLAG_ALIASES = {
    compressed_tensors.METHOD: {"compressed-tensors", "compressed_tensors"},
    awq.METHOD: {"awq", "awq_marlin", "auto_awq", "marlin"},
    gptq.METHOD: {"gptq", "gptq_marlin", "auto_gptq", "marlin"},
    fp8.Fp8Reader.METHOD: {"fp8"},
}
_READERS = {compressed_tensors.METHOD: compressed_tensors.CompressedTensorsReader,
            awq.METHOD: awq.AwqReader, gptq.METHOD: gptq.GptqReader,
            fp8.Fp8Reader.METHOD: fp8.Fp8Reader}


class FormatReader(Protocol):
    method: str

    def read_weight(self, tensors: Mapping[str, np.ndarray], prefix: str,
                    shape: tuple[int, int]) -> GroupQuant | None: ...

    def describe(self) -> str: ...

    def owns(self, name: str) -> bool: ...


def supported_text() -> str:
    return "; ".join((compressed_tensors.SUPPORTED, awq.SUPPORTED, gptq.SUPPORTED,
                      _FP8_SUPPORTED))


def refusal(found: str) -> str:
    """The message for a quantization method we cannot read, naming what was found."""
    return (f"quantization method {found!r} is not supported by xla-inference's checkpoint "
            f"readers; supported methods: {', '.join(SUPPORTED_METHODS)} ({supported_text()})")


def normalize_method(method: str) -> str:
    method = str(method).strip().lower()
    return compressed_tensors.METHOD if method == "compressed_tensors" else method


def reader_for(quantization_config: Mapping | None,
               method_override: str | None = None) -> FormatReader | None:
    """The reader for a checkpoint's quantization_config (None: not quantized).

    `method_override` is vLLM's --quantization: it must agree with the checkpoint's
    quant_method (vLLM's aliases such as awq_marlin or gptq_marlin count as agreeing).
    Without a quantization_config any override raises: online quantization of a float
    checkpoint is not a checkpoint format, the caller handles it before asking here."""
    if not quantization_config:
        if method_override is None:
            return None
        raise ValueError(f"--quantization {method_override} was given but the checkpoint "
                         "has no quantization_config (it is not quantized)")
    found = normalize_method(quantization_config.get("quant_method", ""))
    if found not in _READERS:
        raise ValueError(refusal(found or "<quantization_config without quant_method>"))
    if method_override is not None and (
            normalize_method(method_override) not in _FLAG_ALIASES[found]):
        raise ValueError(f"--quantization {method_override} disagrees with the checkpoint's "
                         f"quant_method {found!r}")
    return _READERS[found](quantization_config)
