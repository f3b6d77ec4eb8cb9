"""vLLM's fused MoE layers on the torch path (torch_models/moe.py), through vLLM's own
classes against transformers over a ragged batch: Qwen3-MoE (softmax top-k, not
renormalised; layer 0 dense), Mixtral (renormalised; a sliding window), and three
architectures without a native family: GLM-4.5 (DeepSeek-V3's grouped sigmoid routing with
a correction bias and a scaling factor, a shared expert), Qwen2-MoE (a gated shared expert)
and OLMoE. Qwen3-MoE through vllm.LLM equals the native family."""

import jax
import numpy as np
import pytest

from tests.helpers import assert_ragged_logits, hf_logits, save_tiny_family
from tests.parallel.test_moe_padding import group_sizes  # noqa: F401 (a fixture)
from tests.torch_models.conftest import MOE_ARCHITECTURES, save_tiny_moe, torch_engine

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PLAN = [{0: 5, 1: 6}, {0: 8, 1: 1, 2: 9}]
FAMILIES = {"qwen3_moe": {}, "mixtral": dict(sliding_window=8)}


def _save(path, name):
    if name in FAMILIES:
        return save_tiny_family(path, name, **FAMILIES[name])
    return save_tiny_moe(path, name)


@pytest.mark.parametrize("name", [*FAMILIES, *MOE_ARCHITECTURES])
def test_moe_ragged_logits_match_transformers(tmp_path, name, group_sizes):  # noqa: F811
    """Also: the group sizes of every MoE layer's grouped products, recorded in the compiled
    steps, count the scheduled tokens' (token, expert) pairs only, never the bucket's
    padding (torch_models/moe.py passes the step's real tokens)."""
    from xla_inference.torch_models.moe import moe_runners

    model_dir = _save(tmp_path / name, name)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 128, n).tolist() for n in (13, 7, 9)]
    expected = [hf_logits(model_dir, p) for p in prompts]  # before vLLM's classes load
    engine = torch_engine(model_dir, model_impl="vllm")
    kinds = {type(p).__name__ for p in engine.params}
    assert {"ExpertsInParam", "ExpertsOutParam"} <= kinds  # our experts, not vLLM's kernel
    group_sizes.clear()
    assert_ragged_logits(engine, prompts, expected, PLAN, 2e-4)
    jax.effects_barrier()
    k = moe_runners(engine.model_cfg.module)[0][1].moe_config.experts_per_token
    scheduled = {k * sum(step.values()) for step in PLAN}  # 11 and 18 tokens: buckets 16, 32
    assert {int(s.sum()) for s in group_sizes} == scheduled, [s.sum() for s in group_sizes]


def test_qwen3_moe_greedy_through_vllm_equals_the_native_family(tmp_path):
    from tests.e2e.engines import generate_ids, num_compilations, shutdown, start_llm

    model_dir = save_tiny_family(tmp_path / "moe", "qwen3_moe", norm_topk_prob=True)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 128, n).tolist() for n in (5, 21, 38)]
    outputs = {}
    for impl in ("native", "vllm"):
        llm = start_llm(model_dir, model_impl=impl, max_num_seqs=4, max_num_batched_tokens=32)
        try:
            compiled_after_warmup = num_compilations(llm)
            outputs[impl] = generate_ids(llm, prompts, max_tokens=10, temperature=0.0,
                                         ignore_eos=True)
            assert num_compilations(llm) == compiled_after_warmup
        finally:
            shutdown(llm)
    assert outputs["vllm"] == outputs["native"]
