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
    from xla_inference.loading.gguf import read_gguf

    metadata, tensors = read_gguf(path)
    try:
        return hf_checkpoint_from_gguf(metadata, tensors)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _gguf_converters() -> dict:
    """GGUF architecture -> (HF config builder, HF state-dict builder)."""
    from xla_inference.loading import gguf, gguf_gemma3

    return {
        "gemma3": (gguf_gemma3.gemma3_hf_config_from_gguf, gguf_gemma3.gemma3_hf_state_dict_from_gguf),
        "llama": (gguf.llama_hf_config_from_gguf, gguf.llama_hf_state_dict_from_gguf),
    }


def hf_checkpoint_from_gguf(metadata: dict, tensors: Mapping[str, np.ndarray]
                            ) -> tuple[dict, Mapping[str, np.ndarray]]:
    """(HF config dict, HF-named float32 tensors) for a GGUF's metadata and tensors (those
    of `read_gguf`, or any mapping of GGUF names to arrays). The HF tensors are made on
    access, one at a time: a lazy `tensors` is never dequantized whole."""
    converters = _gguf_converters()
    arch = metadata.get("general.architecture")
    if arch not in converters:
        raise ValueError(f"GGUF architecture {arch!r} is not supported yet "
                         f"(supported: {', '.join(sorted(converters))})")
    make_config, make_state = converters[arch]
    config = make_config(metadata, tensors.keys())
    return config, make_state(tensors, config)
