"""Build a model (family, config, host params) from a checkpoint, or random weights of its
shapes."""

import json
from pathlib import Path

from xla_inference.loading.checkpoint import load_checkpoint
from xla_inference.loading.params import RandomTensors, quantize_projections
from xla_inference.models.interface import ModelFamily
from xla_inference.models.registry import model_family
from xla_inference.quantization.kv_cache_scales import (attach_kv_cache_scales,
                                                        declares_kv_cache_scales)
from xla_inference.quantization.online import ONLINE_METHODS


def load_model(model_path: str | Path, dtype, gguf_file: str | None = None, *,
               random_seed: int | None = None, quantization: str | None = None,
               reads_slices: bool = False) -> tuple[ModelFamily, object, object]:
    """(family, model config, host params in `dtype`). random_seed: random weights of the
    config's shapes instead of the checkpoint's (vLLM's --load-format dummy); only
    config.json is read, so a directory holding just that serves a benchmark at any size.
    A quantized checkpoint's projection weights come back as GroupQuants
    (quantization/groups.py), which runner/build.py packs for the device. reads_slices:
    weights left unread until placement reads each device's slice
    (loading/checkpoint.load_checkpoint)."""
    path = Path(model_path)
    if random_seed is not None and path.is_dir() and not gguf_file:
        hf_config, tensors = json.loads((path / "config.json").read_text()), None
    else:
        hf_config, tensors = load_checkpoint(model_path, gguf_file, quantization,
                                             reads_slices=reads_slices)
    if random_seed is not None:
        tensors = RandomTensors(random_seed)
    family = model_family(hf_config)
    cfg = family.config_from_hf(hf_config)
    params = family.load_params(tensors, cfg, dtype)
    declared = declares_kv_cache_scales(hf_config.get("quantization_config"))
    if random_seed is None:  # dummy weights: the cache scales stay 1.0
        params = attach_kv_cache_scales(params, tensors, required=declared)
    if quantization in ONLINE_METHODS and not hasattr(tensors, "quantized_weight"):
        # Online only on an unquantized checkpoint: an FP8 checkpoint also comes as "fp8",
        # and the layers it left unquantized (ignored_layers) stay so.
        params = quantize_projections(params, ONLINE_METHODS[quantization])
    return family, cfg, params
