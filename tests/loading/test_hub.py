"""A model named by its hub id loads from the hub's cache as a local checkpoint (vLLM keeps
the id as --model when online; the native loaders read local files)."""

import shutil
from pathlib import Path

import pytest

from tests.helpers import save_tiny_llama
from xla_inference.loading.hub import local_checkpoint

REVISION = "a" * 40


def _hub_cache(tmp_path: Path) -> Path:
    """A hub cache holding `xla-test/tiny-llama` at REVISION, as huggingface_hub lays one out."""
    source = save_tiny_llama(tmp_path / "source")
    repo = tmp_path / "hub" / "models--xla-test--tiny-llama"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return tmp_path / "hub"


def test_a_local_path_is_itself(tmp_path):
    model = save_tiny_llama(tmp_path / "llama")
    assert local_checkpoint(str(model)) == str(model)


def test_a_hub_id_is_its_cached_snapshot(tmp_path, monkeypatch):
    import huggingface_hub

    cache = _hub_cache(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here
    path = Path(local_checkpoint("xla-test/tiny-llama", download_dir=str(cache)))
    assert path == cache / "models--xla-test--tiny-llama" / "snapshots" / REVISION
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    from xla_inference.models.loader import load_model

    import numpy as np

    _, cfg, _ = load_model(path, np.float32)  # what the worker then loads
    assert cfg.num_layers == 2
    with pytest.raises(Exception):
        local_checkpoint("xla-test/absent", download_dir=str(cache))
