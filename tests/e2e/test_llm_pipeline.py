"""vllm.LLM with --pipeline-parallel-size: the layers in stages over a stage axis of our one
mesh (parallel/pipeline.py), alone and with tensor parallel inside each stage, on virtual
CPU devices (tests/conftest.py makes 8): greedy output equal to one device's (transformers'
float32 greedy, which one device's equals: test_llm_families), nothing compiled after
warm-up; with data parallel replicas too. (Refusals: tests/plugin/test_refusals.py.)"""

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, num_compilations, shutdown, start_llm
from tests.helpers import hf_greedy_ids, save_tiny_family, save_tiny_model

pytestmark = pytest.mark.slow

NUM_NEW = 12


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(3, 128, size=n).tolist() for n in (7, 26, 40, 13)]


def _tiny_llama(path):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, bos_token_id=1, eos_token_id=2)
    return save_tiny_model(path, config)


def _run(model_dir, prompts, **parallel):
    """(greedy ids, compiles during generation, mesh shape)."""
    llm = start_llm(model_dir, max_num_batched_tokens=32, **parallel)
    try:
        compiled = num_compilations(llm)
        ids = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
        return ids, num_compilations(llm) - compiled, llm.collective_rpc("mesh_shape")[0]
    finally:
        shutdown(llm)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_pipeline_parallel_matches_one_device(tmp_path, prompts, family):
    model_dir = (_tiny_llama(tmp_path / "llama") if family == "llama"
                 else save_tiny_family(tmp_path / "qwen3", "qwen3", num_hidden_layers=4))
    single = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    for pp, tp in ((2, 1), (2, 2)):
        got, compiles, mesh = _run(model_dir, prompts, pipeline_parallel_size=pp,
                                   tensor_parallel_size=tp)
        assert mesh == {"stage": pp, "data": 1, "model": tp}
        assert compiles == 0, (pp, tp)
        assert got == single, (pp, tp)



def test_pipeline_parallel_with_data_parallel_matches_one_device(tmp_path, prompts):
    """PP 2 x DP 2 x TP 2 on the 8 virtual devices: two replicas (their own schedulers,
    requests and KV pages), each running its micro-batches over the two stages of its own
    data slice: transformers' greedy output (which PP 2 x TP 2 alone gives on the same
    checkpoint and prompts: test_pipeline_parallel_matches_one_device[llama]), nothing
    compiled after warm-up, and both replicas ran requests."""
    model_dir = _tiny_llama(tmp_path / "llama")
    single = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = start_llm(model_dir, max_num_batched_tokens=32, pipeline_parallel_size=2,
                    tensor_parallel_size=2, additional_config={"data_parallel_size": 2})
    try:
        compiled = num_compilations(llm)
        got = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
        assert num_compilations(llm) == compiled
        rows = llm.collective_rpc("replica_rows")[0]
        mesh = llm.collective_rpc("mesh_shape")[0]
    finally:
        shutdown(llm)
    assert mesh == {"stage": 2, "data": 2, "model": 2}
    assert got == single
    assert len(rows) == 2 and min(rows) > 0, rows
