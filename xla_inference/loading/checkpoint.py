"""Opening a model: a HF directory (safetensors, single or sharded) or a GGUF file."""

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from xla_inference.loading.safetensors import CheckpointTensors, safetensors_files


def load_checkpoint(model_path: str | Path, gguf_file: str | None = None
                    ) -> tuple[dict, Mapping[str, np.ndarray]]:
    """(HF config dict, HF-named tensors) for a model directory or a .gguf file."""
    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path)
    if gguf_file:
        return _load_gguf(path / gguf_file)
    config = json.loads((path / "config.json").read_text())
    return config, CheckpointTensors(safetensors_files(path))


def _load_gguf(path: Path) -> tuple[dict, Mapping[str, np.ndarray]]:
    from xla_inference.loading.gguf import (llama_hf_config_from_gguf,
                                            llama_hf_state_dict_from_gguf, read_gguf)
    metadata, tensors = read_gguf(path)
    if metadata.get("general.architecture") != "llama":
        raise ValueError(f"{path}: GGUF architecture {metadata.get('general.architecture')!r} "
                         "is not supported yet (supported: llama)")
    config = llama_hf_config_from_gguf(metadata, tensors.keys())
    return config, llama_hf_state_dict_from_gguf(tensors, config)
