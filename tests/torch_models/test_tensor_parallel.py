"""The torch path over a tensor parallel mesh (2 of the 8 virtual CPU devices): the
weights of vLLM's column, row and vocabulary parallel layers are split as the native
ones are, and the ragged logits equal one device's."""

import numpy as np
import pytest

from tests.helpers import ENGINE_BLOCK, engine_request, run_chunks
from tests.torch_models.conftest import torch_engine

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PLAN = [{0: 5, 1: 6}, {0: 8, 1: 1, 2: 9}]


def _rows(engine, prompts):
    reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(prompts)]
    return run_chunks(engine, reqs, PLAN)


def test_tp2_logits_equal_one_device(tiny_architecture):
    from xla_inference.parallel.sharding import build_mesh

    model_dir = tiny_architecture("phi3")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, n).tolist() for n in (13, 7, 9)]
    one = _rows(torch_engine(model_dir), prompts)
    engine = torch_engine(model_dir, mesh=build_mesh(2), tensor_parallel_size=2)
    split = {type(p).__name__: p.value.sharding.spec for p in engine.params}
    assert split["ColumnParam"][0] == "model" and split["RowParam"][1] == "model"
    assert split["VocabParam"][0] == "model"
    two = _rows(engine, prompts)
    assert one.keys() == two.keys() and ENGINE_BLOCK == 4
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-5)


def test_tp2_splits_the_experts_and_logits_equal_one_device(tmp_path):
    """vLLM's fused MoE on our experts (torch_models/moe.py): each of the 2 devices holds
    half of the 8 experts, as the native families place them."""
    from tests.helpers import save_tiny_family
    from xla_inference.parallel.sharding import build_mesh

    model_dir = save_tiny_family(tmp_path / "moe", "qwen3_moe")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, n).tolist() for n in (13, 7, 9)]
    one = _rows(torch_engine(model_dir, model_impl="vllm"), prompts)
    engine = torch_engine(model_dir, mesh=build_mesh(2), tensor_parallel_size=2,
                          model_impl="vllm")
    split = {type(p).__name__: p.value.sharding.spec for p in engine.params}
    assert split["ExpertsInParam"][0] == "model" and split["ExpertsOutParam"][0] == "model"
    two = _rows(engine, prompts)
    assert one.keys() == two.keys()
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-5)
