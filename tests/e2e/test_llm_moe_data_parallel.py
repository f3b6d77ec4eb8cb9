"""vllm.LLM on a tiny random Qwen3-MoE with data parallel replicas and expert parallel
(vLLM's "DP attention + EP"): two replicas, each with its own scheduler, requests and KV
pages, attention on its own data slice, the experts split over all 4 devices of the
(data 2, model 2) mesh; greedy output equal to transformers', nothing compiled after
start-up, and both replicas ran requests."""

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, num_compilations, shutdown, start_llm
from tests.helpers import hf_greedy_ids, save_tiny_family

pytestmark = pytest.mark.slow

NUM_NEW = 12


def test_moe_data_parallel_2_expert_parallel_matches_transformers(tmp_path):
    model_dir = save_tiny_family(tmp_path / "moe", "qwen3_moe", norm_topk_prob=True)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (7, 26, 40, 13, 31, 5)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = start_llm(model_dir, tensor_parallel_size=2, enable_expert_parallel=True,
                    max_num_batched_tokens=32, additional_config={"data_parallel_size": 2})
    try:
        compiled = num_compilations(llm)
        got = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
        assert num_compilations(llm) == compiled  # every replica-batch bucket warmed up
        rows = llm.collective_rpc("replica_rows")[0]
        mesh = llm.collective_rpc("mesh_shape")[0]
    finally:
        shutdown(llm)
    assert got == expected
    assert mesh == {"data": 2, "model": 2}
    assert len(rows) == 2 and min(rows) > 0, rows  # both replicas ran requests


def test_mtp_with_data_parallel_replicas_equals_the_target_alone(tmp_path):
    """mtp speculative decoding (a tiny DeepSeek-V3 whose checkpoint keeps one MTP layer,
    its "echo" weights) with two replicas: the target's experts split across them, the MTP
    layer drafting for every replica's rows; greedy output equals transformers' greedy
    output of the target alone, drafts are accepted, nothing compiles after start-up."""
    from tests.deepseek_mtp_checkpoint import save_tiny_deepseek_mtp
    from tests.e2e.engines import metric

    model_dir = save_tiny_deepseek_mtp(tmp_path / "deepseek", echo=True)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 21, 38, 9)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = start_llm(model_dir, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96,
                    enable_expert_parallel=True, additional_config={"data_parallel_size": 2},
                    speculative_config={"method": "mtp", "num_speculative_tokens": 3})
    try:
        compiled = num_compilations(llm)
        got = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
        assert num_compilations(llm) == compiled
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
        rows = llm.collective_rpc("replica_rows")[0]
    finally:
        shutdown(llm)
    assert got == expected
    assert accepted > 0
    assert len(rows) == 2 and min(rows) > 0, rows
