"""Build a model (module, config, params) from a checkpoint."""

from pathlib import Path
from types import ModuleType

from xla_inference.loading.checkpoint import load_checkpoint
from xla_inference.models.registry import model_module


def load_model(model_path: str | Path, dtype, gguf_file: str | None = None
               ) -> tuple[ModuleType, object, object]:
    """(model module, model config, params in `dtype`)."""
    hf_config, tensors = load_checkpoint(model_path, gguf_file)
    module = model_module(hf_config)
    cfg = module.Config.from_hf(hf_config)
    return module, cfg, module.load_params(tensors, cfg, dtype)
