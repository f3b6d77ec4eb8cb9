"""A model named by its Hugging Face hub id, as a local checkpoint the loaders can read."""

from pathlib import Path

# What the native loaders read: the config and the weights (safetensors, sharded or not,
# with their index), a sentence-transformers model's module configs, a GGUF.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.gguf"]


def local_checkpoint(model: str, revision: str | None = None, download_dir: str | None = None,
                     *, weights: bool = True) -> str:
    """`model` itself when it is a local path; else the hub id's snapshot, fetched (or
    found in the cache) as vLLM's own weight loader does: vLLM keeps a hub id as the model
    (it swaps in the cached snapshot only under HF_HUB_OFFLINE), and `vllm serve org/name`
    must load here too. revision: --revision; download_dir: --download-dir (the cache);
    weights: False fetches the configs alone (random weights: --load-format dummy)."""
    if Path(model).exists():
        return model
    from huggingface_hub import snapshot_download

    return snapshot_download(model, revision=revision, cache_dir=download_dir,
                             allow_patterns=CHECKPOINT_FILES if weights else ["*.json"])
