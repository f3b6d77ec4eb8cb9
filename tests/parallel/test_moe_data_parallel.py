"""MoE under data parallel replicas (vLLM's "DP attention + expert parallel") through the
engine on the 8 virtual CPU devices: each replica runs its own requests' attention on its
data slice, while the routed experts split over every device of the (data, model) mesh,
by expert (--enable-expert-parallel) or by the intermediate width (vLLM's default, tensor
parallel of every expert over DP x TP ranks), and each replica's MoE blocks take every
replica's tokens (layers/moe.py, _routed_across_replicas).

A tiny Qwen3-MoE and a tiny DeepSeek-V3 (MLA, grouped sigmoid routing, a shared expert) at
DP 2 x TP 2 and DP 2 x TP 4, expert parallel on and off: each replica's requests (chunked
prefills, then a mixed step) give the one-device engine's logits (1e-4, as the expert
parallel tests); the same steps again compile nothing; the experts are placed over both
axes, and where they split by expert the compiled step gathers no expert weight."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import engine_request, run_chunks, save_tiny_family
from tests.models.test_deepseek_v3 import save_tiny_deepseek_v3
from xla_inference.parallel.sharding import build_mesh
from xla_inference.runner import compile_counter
from xla_inference.runner.build import Precision, build_engine, load
from xla_inference.runner.engine import EngineConfig

PROMPTS = [[5, 9, 14, 3, 77, 21, 40, 8], list(range(20, 34)), [101, 7, 66], list(range(40, 51))]
# First KV page of each request: 64 pages, 32 per replica, so r0 and r2 run on replica 0,
# r1 and r3 on replica 1 (and every page id is valid on one device too).
FIRST_PAGES = [1, 33, 9, 41]
PLAN = [{0: 7, 1: 5, 3: 11}, {0: 1, 1: 9, 2: 3}]  # prefill (chunked), then a mixed step
SAVERS = {"qwen3_moe": lambda path: save_tiny_family(path, "qwen3_moe"),
          "deepseek_v3": save_tiny_deepseek_v3}
EXPERT_WIDTH = {"qwen3_moe": 48, "deepseek_v3": 32}  # moe_intermediate_size; hidden 64


def _engine(model_dir, mesh=None, expert_parallel=False):
    f32 = jnp.dtype(jnp.float32)
    model = load(model_dir, Precision(f32, f32, f32))
    ecfg = EngineConfig(num_blocks=64, block_size=4, max_num_tokens=32, max_num_seqs=8,
                        max_model_len=128)
    return build_engine(model, ecfg, mesh=mesh, expert_parallel=expert_parallel)


def _logits(engine) -> dict:
    reqs = [engine_request(f"r{i}", p, FIRST_PAGES[i]) for i, p in enumerate(PROMPTS)]
    return run_chunks(engine, reqs, PLAN)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """family -> (checkpoint, the one-device engine's logits), each made once."""
    made = {}

    def get(name):
        if name not in made:
            model_dir = SAVERS[name](tmp_path_factory.mktemp(name) / "m")
            made[name] = model_dir, _logits(_engine(model_dir))
        return made[name]

    return get


def _routed_experts(engine):
    return next(layer.mlp for layer in engine.params.layers if hasattr(layer.mlp, "router"))


def _expert_gathers(engine, width: int) -> list[str]:
    """all-gathers in the compiled DP step whose result has an expert weight's [n, 64, F]
    or [n, F, 64] shape (any n: whole, or one replica's cut)."""
    reqs = [engine_request(f"hlo{i}", list(range(3, 15)), FIRST_PAGES[i]) for i in (0, 1)]
    args = engine._replica_batch([(req, 12) for req in reqs])
    hlo = engine.lower_step(*args).compile().as_text()
    assert "all-gather(" in hlo  # the replicas' tokens, gathered for the experts
    return re.findall(rf"\[\d+,(?:64,{width}|{width},64)\]\S* all-gather\(", hlo)


@pytest.mark.parametrize("name,tp,expert_parallel", [
    ("qwen3_moe", 2, True), ("qwen3_moe", 4, False),
    ("deepseek_v3", 2, False), ("deepseek_v3", 4, True)])
def test_replicas_share_the_experts_and_equal_one_device(one_device, name, tp, expert_parallel):
    model_dir, want = one_device(name)
    engine = _engine(model_dir, build_mesh(tp, data_parallel_size=2), expert_parallel)
    both_axes = ("data", "model")
    spec = tuple(_routed_experts(engine).w_gate.sharding.spec)
    assert spec == ((both_axes, None, None) if expert_parallel else (None, None, both_axes))
    before = None
    for _ in range(2):  # the second round: the same shapes, no compile
        got = _logits(engine)
        assert got.keys() == want.keys()
        for key, row in want.items():
            np.testing.assert_allclose(got[key], row, rtol=1e-4, atol=1e-4, err_msg=str(key))
        if before is not None:
            assert compile_counter.num_compilations() == before
        before = compile_counter.num_compilations()
    assert engine.rows_per_replica.tolist() == [6, 6]  # r0, r2 | r1, r3 twice, 3 steps each
    if expert_parallel:
        assert _expert_gathers(engine, EXPERT_WIDTH[name]) == []
    jax.clear_caches()


@pytest.mark.parametrize("factor", [100.0, 1e-6])  # every row fits / overflow: all-reduce
def test_dispatch_over_both_axes_equals_each_replicas_reference(monkeypatch, factor):
    """A block's experts split by expert over DP 2 x TP 2, all-to-all dispatch over both
    axes (XLA_INFERENCE_MOE_DISPATCH), each replica its own 13 tokens (padded to the
    devices' multiple), as runner/engine._forward_replicas nests it: each replica's rows
    equal the dense reference on its own tokens, and no expert weight is gathered; a
    capacity too small for the routing falls back to the all-reduce path, as under TP."""
    import types

    from jax.sharding import PartitionSpec

    from tests.parallel.test_collective_matmul import collectives
    from tests.parallel.test_moe_expert_parallel import CFG, D, _dense_block
    from xla_inference.layers import moe
    from xla_inference.layers.moe import moe_mlp, moe_mlp_dense
    from xla_inference.parallel.sharding import (param_shardings, place_params,
                                                 replica_local_specs, traced_over)

    monkeypatch.setenv("XLA_INFERENCE_MOE_DISPATCH", "all-to-all")
    monkeypatch.setattr(moe, "DISPATCH_CAPACITY_FACTOR", factor)
    block, tokens = _dense_block(), 13
    mesh = build_mesh(2, data_parallel_size=2)
    model_cfg = types.SimpleNamespace(moe=CFG, intermediate_size=96)
    shardings = param_shardings(block, model_cfg, mesh, "experts")
    placed = place_params(block, shardings)
    x = np.random.default_rng(3).standard_normal((2, tokens, D)).astype(np.float32)

    def replicas(p, x):
        return jax.shard_map(lambda p, x: moe_mlp(p, x[0], CFG)[None], mesh=mesh,
                             in_specs=(replica_local_specs(shardings), PartitionSpec("data")),
                             out_specs=PartitionSpec("data"), axis_names={"data"},
                             check_vma=False)(p, x)

    step = jax.jit(traced_over(mesh, replicas)).lower(placed, x).compile()
    got = np.asarray(step(placed, x))
    for replica in range(2):
        want = np.asarray(jax.jit(moe_mlp_dense, static_argnums=2)(block, x[replica], CFG))
        np.testing.assert_allclose(got[replica], want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    hlo = step.as_text()
    assert collectives(hlo).get("all-to-all", 0) >= 4
    assert re.findall(r"\[\d+,(?:64,48|48,64)\]\S* all-gather\(", hlo) == []
    jax.clear_caches()
