"""vLLM's --load-format dummy on our platform: random weights of the checkpoint's shapes,
from a directory that holds only config.json and a tokenizer (benchmarks at any model size
need no weight files)."""

import shutil

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, shutdown, start_llm
from tests.helpers import hf_greedy_ids, save_tiny_llama

pytestmark = pytest.mark.slow


def test_dummy_weights_serve_without_weight_files(tmp_path):
    real_dir = save_tiny_llama(tmp_path / "llama")
    bare = tmp_path / "bare"
    shutil.copytree(real_dir, bare, ignore=shutil.ignore_patterns("*.safetensors*"))
    assert not list(bare.glob("*.safetensors"))
    prompts = [np.random.default_rng(5).integers(3, 128, size=n).tolist() for n in (4, 19)]
    llm = start_llm(bare, load_format="dummy")
    try:
        got = generate_ids(llm, prompts, max_tokens=8, temperature=0.0, ignore_eos=True)
    finally:
        shutdown(llm)
    assert [len(g) for g in got] == [8, 8]
    # Random weights, not the checkpoint's (which this directory does not even hold).
    assert got != hf_greedy_ids(real_dir, prompts, 8)
