"""Expert parallel MoE by all-to-all dispatch (layers/moe.py, _dispatched_experts) on the
8 virtual CPU devices: each device takes its slice of the tokens, sends each token's row
only to the devices holding its chosen experts, runs its GMM on what it received (the
Pallas TPU / GPU GMM in interpret mode, or XLA's ragged_dot / per-row gather where no
Pallas kernel is on the route), and the partial sums come back by all-to-all.

- with room for every row (the capacity at its bound) the dispatch path alone runs and
  gives the float reference's output (every expert on every token: moe_mlp_dense on one
  device); with a capacity too small for the routing every device takes the all-reduce
  path instead, and the output is the same: no token dropped;
- the compiled program holds the all-to-alls and gathers no expert weight (its only
  all-gather is the [T, D] of outputs);
- the choice: dispatch where it moves fewer bytes than the all-reduce."""

import math
import re
import types

import jax
import numpy as np
import pytest

from tests.helpers import pallas_tpu_gmm_in_interpret_mode
from tests.parallel.test_collective_matmul import collectives
from tests.parallel.test_moe_expert_parallel import WEIGHTED_INPUTS, _dense_block, _quantized
from xla_inference.kernels import pallas_gmm
from xla_inference.layers import moe
from xla_inference.layers.moe import Experts, MoeConfig, moe_mlp, moe_mlp_dense
from xla_inference.parallel.sharding import build_mesh, param_shardings, place_params, traced_over
from xla_inference.quantization.groups import INT8

E, D, T = 8, 64, 13  # 13 tokens: padded to the devices' multiple
CFG = MoeConfig(num_experts=E, num_experts_per_tok=2, intermediate_size=48, norm_topk_prob=True)
NO_DROP, TOO_SMALL = 100.0, 1e-6  # capacity factors: every row fits / one row per device


@pytest.fixture(autouse=True)
def _dispatch(monkeypatch):
    monkeypatch.setenv("XLA_INFERENCE_MOE_DISPATCH", "all-to-all")
    yield from pallas_tpu_gmm_in_interpret_mode(monkeypatch)


def _on_mesh(block, x, tp, cfg):
    mesh = build_mesh(tp)
    model_cfg = types.SimpleNamespace(moe=cfg, intermediate_size=48)
    placed = place_params(block, param_shardings(block, model_cfg, mesh))
    step = jax.jit(traced_over(mesh, lambda p, x: moe_mlp(p, x, cfg))).lower(placed, x).compile()
    return np.asarray(step(placed, x)), step.as_text()


# (GMM route, tp, experts, routing, capacity factor); the TPU GMM's interpret mode and the
# quantized experts compile slowly (20-45 s on the shared 2 cores): slow-marked.
CASES = [("gpu", 4, "float32", WEIGHTED_INPUTS, NO_DROP), ("xla", 8, "float32", CFG, NO_DROP),
         ("gpu", 4, "float32", CFG, TOO_SMALL),
         pytest.param("tpu", 2, "float32", CFG, NO_DROP, marks=pytest.mark.slow),
         pytest.param("gpu", 4, INT8, CFG, NO_DROP, marks=pytest.mark.slow)]


@pytest.mark.parametrize("route,tp,kind,cfg,factor", CASES)
def test_dispatch_equals_reference_without_expert_gathers(route, tp, kind, cfg, factor,
                                                          monkeypatch):
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, route)
    monkeypatch.setattr(moe, "DISPATCH_CAPACITY_FACTOR", factor)
    block = _dense_block()
    if kind != "float32":
        block = _quantized(block, kind)
    x = np.random.default_rng(3).standard_normal((T, D)).astype(np.float32)
    want = np.asarray(jax.jit(moe_mlp_dense, static_argnums=2)(block, x, cfg))
    got, hlo = _on_mesh(block, x, tp, cfg)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    found = collectives(hlo)
    assert found.get("all-to-all", 0) >= 4, found  # rows, weights, experts there; sums back
    padded = -(-T // tp) * tp
    gathers = re.findall(r"(\w+\[[0-9,]*\])\S* all-gather\(", hlo)
    assert gathers == [f"f32[{padded},{D}]"], gathers  # the outputs only, no expert weight


def test_capacity_too_small_overflows_to_the_all_reduce():
    """The slots of each destination, and the overflow flag the path choice reads."""
    owners = np.array([[0, 1], [1, 1], [1, 0], [-1, -1]])  # device of each chosen expert
    token_at, overflow = moe._dispatch_slots(owners, devices=2, capacity=3)
    assert np.asarray(token_at).tolist() == [[0, 2, 4], [0, 1, 2]] and int(overflow) == 0
    token_at, overflow = moe._dispatch_slots(owners, devices=2, capacity=2)
    assert np.asarray(token_at).tolist() == [[0, 2], [0, 1]] and int(overflow) == 1


def _capacity(num_experts, k, devices, tokens):
    stacked = jax.ShapeDtypeStruct((num_experts, D, 48), np.float32)
    return moe._dispatch_capacity(Experts(stacked, stacked, stacked), tokens, k, devices,
                                  "experts")


def test_dispatch_is_chosen_where_it_moves_fewer_bytes(monkeypatch):
    monkeypatch.setenv("XLA_INFERENCE_MOE_DISPATCH", "auto")
    # k = 2 of 64 experts over 8 devices: a device gets 23% of the tokens (x 1.25 skew);
    # 2 C = 2 * 10 < T / n = 32 rows: dispatch.
    assert _capacity(64, 2, 8, 256) == 10
    assert _capacity(64, 8, 8, 256) is None  # 66% of the tokens go to each device
    assert _capacity(8, 2, 2, 256) is None  # two devices: every token goes nearly everywhere
    assert _capacity(64, 2, 8, 8) is None  # one token per device: nothing to save
    monkeypatch.setenv("XLA_INFERENCE_MOE_DISPATCH", "all-reduce")
    assert _capacity(64, 2, 8, 256) is None
    monkeypatch.setenv("XLA_INFERENCE_MOE_DISPATCH", "all-to-all")
    share = 1 - math.comb(56, 8) / math.comb(64, 8)  # a token's 8 experts not all elsewhere
    assert _capacity(64, 8, 8, 256) == math.ceil(1.25 * share * 32) == 28  # forced
    monkeypatch.setenv("XLA_INFERENCE_MOE_DISPATCH", "sometimes")
    with pytest.raises(ValueError, match="XLA_INFERENCE_MOE_DISPATCH"):
        _capacity(64, 2, 8, 256)


@pytest.mark.slow
def test_qwen3_moe_steps_dispatched_equal_one_device(tmp_path, monkeypatch):
    """A tiny Qwen3-MoE's engine steps (a chunked prefill, then a mixed step) with every
    MoE layer dispatched by all-to-all over 4 devices: the one-device default path's
    logits (ragged_dot), and no expert weight gathered in the compiled step."""
    from tests.helpers import save_tiny_family
    from tests.parallel.test_moe_expert_parallel import _engine_logits, _expert_gathers

    model_dir = save_tiny_family(tmp_path / "m", "qwen3_moe")
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, "xla")
    monkeypatch.setenv("XLA_INFERENCE_MOE_DISPATCH", "all-reduce")
    _, want = _engine_logits(model_dir)
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, "gpu")
    monkeypatch.setenv("XLA_INFERENCE_MOE_DISPATCH", "all-to-all")
    engine, got = _engine_logits(model_dir, build_mesh(4))
    assert got.keys() == want.keys()
    for key, row in want.items():
        np.testing.assert_allclose(got[key], row, rtol=1e-4, atol=1e-4, err_msg=str(key))
    assert _expert_gathers(engine) == []


@pytest.mark.slow
def test_dispatch_nested_in_data_parallel_replicas(monkeypatch):
    """DP 2 x TP 2: each replica's block (its own tokens) dispatched over its model-axis
    devices inside the replicas' shard_map, as runner/engine._forward_replicas nests it."""
    from jax.sharding import PartitionSpec

    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, "gpu")
    monkeypatch.setattr(moe, "DISPATCH_CAPACITY_FACTOR", NO_DROP)
    block = _dense_block()
    mesh = build_mesh(2, data_parallel_size=2)
    model_cfg = types.SimpleNamespace(moe=CFG, intermediate_size=48)
    placed = place_params(block, param_shardings(block, model_cfg, mesh))
    x = np.random.default_rng(3).standard_normal((2, T, D)).astype(np.float32)

    def replicas(p, x):
        return jax.shard_map(lambda p, x: moe_mlp(p, x[0], CFG)[None], mesh=mesh,
                             in_specs=(PartitionSpec(), PartitionSpec("data")),
                             out_specs=PartitionSpec("data"), axis_names={"data"},
                             check_vma=False)(p, x)

    step = jax.jit(traced_over(mesh, replicas)).lower(placed, x).compile()
    got = np.asarray(step(placed, x))
    for replica in range(2):
        want = np.asarray(jax.jit(moe_mlp_dense, static_argnums=2)(block, x[replica], CFG))
        np.testing.assert_allclose(got[replica], want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    assert collectives(step.as_text()).get("all-to-all", 0) >= 4
