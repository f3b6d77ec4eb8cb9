"""vLLM QuantizationConfig classes for the methods only xla-inference implements (online
`int8`, `gguf`), registered under those names by plugin/quantization.register_methods so
that vLLM's config checks accept them. They live at module level because vLLM pickles the
VllmConfig, with its quant_config, into the engine-core process. They only pass vLLM's
config-time checks: the worker never builds vLLM's torch layers. Imports vLLM's
quantization package, so import it only once vLLM has chosen its platform."""

import torch
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig


class _XlaOnlyConfig(QuantizationConfig):
    """Any activation dtype (ours run float32 and 16-bit alike), no GPU capability, no
    config file of its own."""

    name: str

    @classmethod
    def get_name(cls) -> str:
        return cls.name

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict) -> "_XlaOnlyConfig":
        return cls()

    def get_quant_method(self, layer, prefix: str):
        raise NotImplementedError(f"xla-inference runs {self.name!r} in its own JAX layers, "
                                  "not in vLLM's torch ones")


class XlaInt8Config(_XlaOnlyConfig):
    """--quantization int8: weights quantized per output channel at load, activations
    per token at run time (quantization/online.py)."""

    name = "int8"


class XlaGgufConfig(_XlaOnlyConfig):
    """A GGUF file's blocks kept quantized (quantization/formats/gguf_blocks.py)."""

    name = "gguf"


CONFIGS = (XlaInt8Config, XlaGgufConfig)
