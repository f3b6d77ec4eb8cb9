"""Quantized weights on a mesh (8 virtual CPU devices, tests/conftest.py): tensor and
expert parallel give the one-device logits, and the packed values, scales and offsets are
split along their weight's axes (no device holds a whole split weight)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import ENGINE_BLOCK, engine_request, run_chunks, save_tiny_family
from xla_inference.parallel.sharding import build_mesh
from xla_inference.quantization.packed import PackedWeight

PLAN = [{0: 11, 1: 9, 2: 4}, {1: 14, 2: 1}]  # a prefill, a chunked prefill, a decode step


def _logits(model_dir, method, mesh=None):
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    model = load(model_dir, Precision.uniform(jnp.float32), quantization=method)
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=64,
                        max_num_seqs=8, max_model_len=128)
    engine = build_engine(model, ecfg, mesh=mesh)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, size=n).tolist() for n in (11, 23, 5)]
    reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(prompts)]
    return engine, run_chunks(engine, reqs, PLAN)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("quantized-sharded")
    return {family: save_tiny_family(base / family, family) for family in ("qwen3", "qwen3_moe")}


@pytest.mark.parametrize("family,method,tp", [("qwen3", "int8", 2), ("qwen3", "fp8", 2),
                                              ("qwen3_moe", "int8", 4)])
def test_quantized_tensor_parallel_equals_one_device(models, family, method, tp):
    assert len(jax.devices()) >= 8
    _, single = _logits(models[family], method)
    engine, sharded = _logits(models[family], method, build_mesh(tp))
    # The int8 product quantizes its input rows to 15 bits: a 1-ulp difference in a row
    # (another partitioning's summation order; on one device the norms are the kernel's,
    # correctly rounded, under a mesh XLA's, whose rsqrt is within an ulp) can move a value
    # by one step, max|x| / 16383, and a few such steps over the layers a logit by ~1e-4.
    tol = 3e-4 if method == "int8" else 1e-5
    for key, row in single.items():
        np.testing.assert_allclose(sharded[key], row, rtol=tol, atol=tol)
    attn = engine.params.layers[0].attn
    assert isinstance(attn.wq, PackedWeight)
    if family == "qwen3":  # 96-wide MLP: 6 tiles of 16 rows, split in 2
        up = engine.params.layers[0].mlp.w_up
        for arr in (up.values, up.scales):  # the MLP width is split over the model axis
            assert arr.sharding.spec[0] == "model", arr.sharding.spec
            for shard in arr.addressable_shards:
                assert shard.data.shape[0] == arr.shape[0] // tp
