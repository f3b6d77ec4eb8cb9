"""The torch path's layer-by-layer load (torch_models/layerwise.py): parameters built as
placeholders, each layer loaded, placed and released in turn. The logits equal
transformers' when every parameter starts as a placeholder and the checkpoint's layers
straddle its files; and the host holds about one layer beside what is placed, measured in
a process of its own (tests/torch_models/layerwise_peak.py) on a 480 MB checkpoint. A
checkpoint that cannot stream (.bin) is loaded whole, still equal to transformers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ENGINE_BLOCK, assert_ragged_logits, hf_logits, save_tiny_model
from tests.torch_models.conftest import ARCHITECTURES, COMMON, vllm_config

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PLAN = [{0: 5, 1: 6}, {0: 8, 1: 1, 2: 9}]
REPO = Path(__file__).resolve().parents[2]


def test_placeholders_and_straddling_files_match_transformers(tmp_path, monkeypatch):
    """Phi-3 (fused qkv and gate_up, loaded from three and two checkpoint tensors) in files
    of 100 KB, so that its layers' tensors come from several files, out of layer order
    (safetensors lists each file's names sorted); every parameter of more than one element
    starts as a placeholder, so a tensor loaded before its layer's storage exists fails."""
    import jax
    import jax.numpy as jnp
    import transformers

    from xla_inference.runner.build import Precision, build_engine
    from xla_inference.runner.engine import EngineConfig
    from xla_inference.torch_models import layerwise, loader

    config_name, own = ARCHITECTURES["phi3"]
    config = getattr(transformers, config_name)(**{**COMMON, **own, "num_hidden_layers": 3})
    model_dir = save_tiny_model(tmp_path / "phi3", config, sharded=True)
    assert len(list(model_dir.glob("*.safetensors"))) > 3
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 128, n).tolist() for n in (13, 7, 9)]
    expected = [hf_logits(model_dir, p) for p in prompts]

    monkeypatch.setattr(layerwise, "_PLACEHOLDER_MIN_ELEMENTS", 2)
    done = []
    f32 = jnp.dtype(jnp.float32)
    model = loader.load_layerwise(vllm_config(model_dir), Precision.uniform(f32),
                                  on_layer_done=done.append)
    assert sorted(done) == [0, 1, 2]
    assert all(isinstance(p.value, jax.Array) for p in model.params)  # placed as loaded
    module = model.cfg.module
    assert all(p.numel() == 0 for p in module.parameters())  # no torch copy left
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=64,
                        max_num_seqs=8, max_model_len=128)
    assert_ragged_logits(build_engine(model, ecfg), prompts, expected, PLAN, 2e-4)


def test_host_peak_is_about_one_layer_over_the_placed_weights(tmp_path):
    """12 layers of 40 MB: loading adds at most the placed weights and 3.5 layers to the
    process' peak resident memory (measured: 2.2; the whole-module load adds 13). Every
    placement takes a copy, as a transfer to a device does (on the CPU backend JAX may
    keep numpy's buffer, which would hide the torch copies); glibc gives large freed
    blocks back at once (a fixed mmap threshold), so resident memory counts live bytes."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(REPO / "tests/torch_models/layerwise_peak.py"),
                          str(tmp_path / "wide"), "--fresh"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    layer = measured["layer_bytes"]
    assert measured["mode"] == "layerwise" and measured["placing_copies"]
    assert measured["num_layers"] == 12 and measured["placed_bytes"] > 11 * layer
    assert measured["peak_set_by_load"]  # the load, not the imports, set the peak
    assert measured["peak_added_bytes"] < measured["placed_bytes"] + 3.5 * layer, measured


def test_a_checkpoint_that_does_not_stream_loads_whole(tiny_architecture, tmp_path, caplog):
    """A PyTorch .bin checkpoint (no safetensors headers to count a layer's tensors by) is
    built with placeholders, then loaded whole as vLLM's loader would: logits equal
    transformers'."""
    import logging
    import shutil

    import jax.numpy as jnp
    import torch
    from safetensors.torch import load_file

    from tests.torch_models.conftest import torch_engine

    saved = tiny_architecture("granite")
    model_dir = tmp_path / "bin"
    shutil.copytree(saved, model_dir, ignore=shutil.ignore_patterns("*.safetensors*"))
    state = {}
    for path in saved.glob("*.safetensors"):
        state.update(load_file(path))
    torch.save(state, model_dir / "pytorch_model.bin")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 128, n).tolist() for n in (13, 7, 9)]
    expected = [hf_logits(model_dir, p) for p in prompts]
    with caplog.at_level(logging.INFO, logger="xla_inference.torch_models.loader"):
        engine = torch_engine(model_dir, narrow_dtype=None, kv_dtype=jnp.float32)
    assert "no layer-by-layer load with checkpoints other than safetensors" in caplog.text
    assert_ragged_logits(engine, prompts, expected, PLAN, 2e-4)
