"""HF architecture name -> the family record (models/interface.ModelFamily) serving it."""

import importlib

from xla_inference.models.interface import ModelFamily

# Family modules, imported on first use; each defines FAMILY.
_FAMILY_MODULES = ("deepseek_v3", "gemma3", "llama", "llama4", "mistral", "mixtral", "qwen2",
                   "qwen3", "qwen3_moe")


def families() -> list[ModelFamily]:
    return [importlib.import_module(f"xla_inference.models.{m}").FAMILY for m in _FAMILY_MODULES]


def supported_architectures() -> list[str]:
    return sorted(arch for family in families() for arch in family.architectures)


def model_family(hf_config: dict) -> ModelFamily:
    """The family for a config's architecture, or a clear error naming what is supported."""
    by_arch = {arch: family for family in families() for arch in family.architectures}
    for arch in hf_config.get("architectures") or []:
        if arch in by_arch:
            return by_arch[arch]
    raise ValueError(
        f"xla-inference does not support architecture {hf_config.get('architectures')}; "
        f"supported: {', '.join(supported_architectures())}")
