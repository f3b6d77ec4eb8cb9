"""What runs across two JAX processes ("hosts") beyond the native decoder (distributed/multihost.py;
the one-process runs of each are proven against transformers or vLLM's CPU backend in
the modules named), one virtual CPU device each, tensor parallel 2 over both unless said:

- speculative decoding whose drafts the model runner proposes on the device (EAGLE-3; MTP
  below; a draft model and EAGLE-1 take the same path, not run here for the suite's time):
  each process runs the same draft programs on its shard of the head and reads the same
  replicated drafts, so every process verifies the same ones. Greedy output equals
  transformers' greedy output of the target alone.
- pooling: an encoder-only BERT embedder (the torch path): every process pools the same
  replicated rows (a decoder embedder pools the same way; not run here for the time).
- an MoE model (DeepSeek-V3) with two data parallel replicas, one per process, experts
  split over both (expert parallel), and its MTP layer drafting.
- the torch path (Phi-3 through vLLM's PyTorch class), and images (Qwen2.5-VL).

Each equals transformers, with nothing compiled after warm-up. One engine per test: the
methods and models differ."""

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, metric, num_compilations, shutdown, start_llm
from tests.eagle3_checkpoint import save_tiny_eagle3, save_tiny_llama_target
from tests.helpers import hf_greedy_ids

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 16
K = 3


@pytest.fixture
def two_hosts(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "2")
    monkeypatch.setenv("XLA_INFERENCE_JOIN_TIMEOUT", "300")


def _prompts():
    rng = np.random.default_rng(3)
    return [rng.integers(3, 128, size=n).tolist() for n in (5, 33, 17)] + [[40, 41] * 10]


def _speculate(target, speculative_config):
    """(greedy outputs, accepted drafts, drafted, programs compiled after warm-up) across
    the two processes."""
    llm = start_llm(target, tensor_parallel_size=2, max_num_seqs=4, max_num_batched_tokens=32,
                    speculative_config=speculative_config)
    try:
        assert llm.collective_rpc("mesh_processes")[0] == [0, 1]
        warm = num_compilations(llm)
        got = generate_ids(llm, _prompts(), max_tokens=NUM_NEW, temperature=0.0,
                           ignore_eos=True)
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
        drafted = metric(llm, "vllm:spec_decode_num_draft_tokens")
        compiled = num_compilations(llm) - warm
    finally:
        shutdown(llm)
    return got, accepted, drafted, compiled


def test_eagle3_across_two_processes(tmp_path, two_hosts):
    from safetensors.numpy import load_file

    target = save_tiny_llama_target(tmp_path / "target")
    embed = load_file(str(target / "model.safetensors"))["model.embed_tokens.weight"]
    head = save_tiny_eagle3(tmp_path / "head", (0, 1, 2), echo_embed=embed)
    got, accepted, drafted, compiled = _speculate(
        target, {"method": "eagle3", "model": str(head), "num_speculative_tokens": K})
    assert got == hf_greedy_ids(target, _prompts(), NUM_NEW)
    assert 0 < accepted < drafted
    assert compiled == 0


def test_moe_data_parallel_with_mtp_across_two_processes(tmp_path, monkeypatch):
    """A tiny DeepSeek-V3 (MoE) with two data parallel replicas, one per process, its experts
    split over both processes' devices (expert parallel), and its own MTP layer drafting
    for every replica's rows: greedy output equals transformers' greedy output of the
    target alone (as the one-process run's does: tests/e2e/test_llm_moe_data_parallel.py),
    drafts are accepted, both replicas ran requests, nothing compiles after warm-up."""
    from tests.deepseek_mtp_checkpoint import save_tiny_deepseek_mtp

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "2")
    monkeypatch.setenv("XLA_INFERENCE_JOIN_TIMEOUT", "300")
    model_dir = save_tiny_deepseek_mtp(tmp_path / "deepseek", echo=True)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 21, 38, 9)]
    llm = start_llm(model_dir, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96,
                    enable_expert_parallel=True, additional_config={"data_parallel_size": 2},
                    speculative_config={"method": "mtp", "num_speculative_tokens": K})
    try:
        assert llm.collective_rpc("mesh_processes")[0] == [0, 1]
        warm = num_compilations(llm)
        got = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
        compiled = num_compilations(llm) - warm
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
        rows = llm.collective_rpc("replica_rows")[0]
    finally:
        shutdown(llm)
    assert got == hf_greedy_ids(model_dir, prompts, NUM_NEW)
    assert accepted > 0
    assert len(rows) == 2 and min(rows) > 0, rows
    assert compiled == 0


def test_torch_path_across_two_processes(tmp_path, two_hosts):
    """Phi-3 (no native family: vLLM's PyTorch model class lowered through torchax) with
    tensor parallel 2 over both processes, each placing its half of every layer as the
    checkpoint streams in: greedy output equals transformers' (as the one-process run's
    does: tests/e2e/test_llm_torch_models.py) with a prompt prefilled in chunks."""
    from tests.torch_models.conftest import save_tiny_architecture

    model_dir = save_tiny_architecture(tmp_path / "phi3", "phi3")
    prompts = _prompts()
    llm = start_llm(model_dir, tensor_parallel_size=2, max_num_seqs=4, max_num_batched_tokens=32)
    try:
        assert llm.collective_rpc("mesh_processes")[0] == [0, 1]
        warm = num_compilations(llm)
        got = generate_ids(llm, prompts, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
        compiled = num_compilations(llm) - warm
    finally:
        shutdown(llm)
    assert got == hf_greedy_ids(model_dir, prompts, NUM_NEW)
    assert compiled == 0


def test_images_across_two_processes(tmp_path, two_hosts, monkeypatch):
    """A tiny Qwen2.5-VL with tensor parallel 2 over both processes: the images' pixels ride
    the step's scheduler output to the follower, and each process runs its half of the
    vision tower and decoder. An image prompt (its placeholders over two steps) batched
    with a text prompt gives transformers' greedy output (as the one-process run's does:
    tests/e2e/test_llm_qwen2_5_vl.py)."""
    from tests.e2e.engines import generate_requests
    from tests.multimodal.tiny_qwen2_5_vl import IMAGE, hf_greedy, image, save_tiny_qwen2_5_vl

    monkeypatch.setenv("XLA_INFERENCE_IMAGE_SIZES", "112x168")
    checkpoint = save_tiny_qwen2_5_vl(tmp_path / "qwen2_5_vl")
    picture = image(112, 168, seed=0)
    prompt, text = f"t5 t6 {IMAGE} t7 t8 t9", "t20 t21 t22 t23"
    llm = start_llm(checkpoint, tensor_parallel_size=2, max_num_batched_tokens=16,
                    max_num_seqs=4, kv_cache_memory_bytes=1 << 20)
    try:
        assert llm.collective_rpc("mesh_processes")[0] == [0, 1]
        warm = num_compilations(llm)
        got = generate_requests(llm, [{"prompt": prompt, "multi_modal_data": {"image": picture}},
                                      {"prompt": text}],
                                max_tokens=8, temperature=0.0, ignore_eos=True)
        compiled = num_compilations(llm) - warm
    finally:
        shutdown(llm)
    assert got == [hf_greedy(checkpoint, prompt, [picture], 8), hf_greedy(checkpoint, text, [], 8)]
    assert compiled == 0


def test_encoder_only_embeddings_across_two_processes(tmp_path, two_hosts):
    """A tiny BERT embedder (vLLM's BertEmbeddingModel on the torch path, cache-free
    bidirectional attention, MEAN pooling) with tensor parallel 2 over both processes:
    sentence embeddings equal transformers' mean-pooled, normalized states (as the
    one-process run's do: tests/e2e/test_llm_encoder_embed.py)."""
    from tests.e2e.test_llm_encoder_embed import (PROMPTS, TOL, _llm_args, _normalized,
                                                  hf_hidden, save_tiny_bert_embedder)
    from vllm import LLM

    model_dir = save_tiny_bert_embedder(tmp_path / "bert")
    llm = LLM(**_llm_args(model_dir), tensor_parallel_size=2)
    try:
        assert llm.collective_rpc("mesh_processes")[0] == [0, 1]
        warm = num_compilations(llm)
        embed = [o.outputs.embedding
                 for o in llm.embed([{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)]
        compiled = num_compilations(llm) - warm
    finally:
        shutdown(llm)
    for got, hidden in zip(embed, hf_hidden(model_dir, PROMPTS)):
        np.testing.assert_allclose(got, _normalized(hidden.mean(axis=0)), atol=TOL, rtol=TOL)
    assert compiled == 0
