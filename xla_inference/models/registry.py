"""HF architecture name -> the module implementing it."""

import importlib
from types import ModuleType

_ARCHITECTURES = {
    "DeepseekV3ForCausalLM": "xla_inference.models.deepseek_v3",
    "Gemma3ForCausalLM": "xla_inference.models.gemma3",
    "LlamaForCausalLM": "xla_inference.models.llama",
    "Llama4ForCausalLM": "xla_inference.models.llama4",
    "MistralForCausalLM": "xla_inference.models.mistral",
    "MixtralForCausalLM": "xla_inference.models.mixtral",
    "Qwen2ForCausalLM": "xla_inference.models.qwen2",
    "Qwen3ForCausalLM": "xla_inference.models.qwen3",
    "Qwen3MoeForCausalLM": "xla_inference.models.qwen3_moe",
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def model_module(hf_config: dict) -> ModuleType:
    """The model module for a config's architecture, or a clear error naming what is supported."""
    for arch in hf_config.get("architectures") or []:
        if arch in _ARCHITECTURES:
            return importlib.import_module(_ARCHITECTURES[arch])
    raise ValueError(
        f"xla-inference does not support architecture {hf_config.get('architectures')}; "
        f"supported: {', '.join(supported_architectures())}")
