"""HF architecture name -> the family record (models/interface.ModelFamily) serving it."""

import importlib

from xla_inference.models.interface import ModelFamily

# Family modules, imported on first use; each defines FAMILY.
_FAMILY_MODULES = ("deepseek_v3", "gemma3", "gemma3_mm", "llama", "llama4", "llama4_mm", "mistral",
                   "mixtral", "qwen2", "qwen2_5_vl", "qwen3", "qwen3_moe")


def families() -> list[ModelFamily]:
    return [importlib.import_module(f"xla_inference.models.{m}").FAMILY for m in _FAMILY_MODULES]


def supported_architectures() -> list[str]:
    return sorted(arch for family in families() for arch in family.architectures)


def native_family(architectures: list[str] | None) -> ModelFamily | None:
    """The family of ours that serves one of these HF architecture names, or None."""
    by_arch = {arch: family for family in families() for arch in family.architectures}
    return next((by_arch[arch] for arch in architectures or [] if arch in by_arch), None)


def model_family(hf_config: dict) -> ModelFamily:
    """The family for a config's architecture, or a clear error naming what is supported."""
    family = native_family(hf_config.get("architectures"))
    if family is not None:
        return family
    raise ValueError(
        f"xla-inference has no native JAX family for architecture "
        f"{hf_config.get('architectures')}; supported: {', '.join(supported_architectures())}; "
        "--model-impl auto or vllm serves it through vLLM's PyTorch model class")
