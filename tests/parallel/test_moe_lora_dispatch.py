"""LoRA experts (lora/slots.LoraExperts) through the all-to-all dispatch (layers/moe.py,
_dispatched_experts) on the virtual CPU devices: each row's adapter column masks travel
with it, so expert adapters no longer send a step to the all-reduce path.

A block of 8 adapted experts split over 4 devices (2 each), tokens of two adapter slots
and of none, some of them padding (routed to no expert): with room for every row the
compiled program dispatches (its all-to-alls carry the masks: one more than without
adapters) and the real rows equal a float64 numpy reference, each projection plus its
token's adapter delta; with a capacity too small the all-reduce path gives the same."""

import types

import jax
import numpy as np
import pytest

from tests.parallel.test_collective_matmul import collectives
from tests.parallel.test_moe_expert_parallel import CFG, D, T, _dense_block
from tests.parallel.test_moe_lora_split import _adapter_stacks, _reference, _with_adapters
from xla_inference.kernels import pallas_gmm
from xla_inference.layers import moe
from xla_inference.layers.moe import moe_mlp
from xla_inference.parallel.sharding import build_mesh, param_shardings, place_params, traced_over

TOKEN_SLOTS = np.array([0, 1, 2, 1, 0, 2, 2, 1, 0, 1, 2, 0], np.int32)
REAL = np.arange(T) < 10  # the last 2 tokens: padding


@pytest.fixture(autouse=True)
def _forced_dispatch(monkeypatch):
    monkeypatch.setenv("XLA_INFERENCE_MOE_DISPATCH", "all-to-all")
    jax.clear_caches()
    yield
    jax.clear_caches()


def _step(block, stacks, x, factor, monkeypatch, adapted=True):
    monkeypatch.setattr(moe, "DISPATCH_CAPACITY_FACTOR", factor)
    mesh = build_mesh(4)
    model_cfg = types.SimpleNamespace(moe=CFG, intermediate_size=48)
    placed = place_params(block, param_shardings(block, model_cfg, mesh))

    def block_step(p, s, slots, x, real):
        return moe_mlp(_with_adapters(p, s, slots) if adapted else p, x, CFG, real)

    step = jax.jit(traced_over(mesh, block_step)).lower(placed, stacks, TOKEN_SLOTS, x,
                                                         REAL).compile()
    return np.asarray(step(placed, stacks, TOKEN_SLOTS, x, REAL)), step.as_text()


@pytest.mark.parametrize("route,factor", [
    ("xla", 100.0), ("xla", 1e-6),
    pytest.param("gpu", 100.0, marks=pytest.mark.slow)],  # GMM in interpret mode: ~30 s
    ids=["dispatched", "overflow_all_reduce", "dispatched_pallas_gpu"])
def test_adapted_experts_dispatched_equal_reference(route, factor, monkeypatch):
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, route)
    block, stacks = _dense_block(), _adapter_stacks()
    x = np.random.default_rng(1).standard_normal((T, D)).astype(np.float32)
    want = _reference(block, stacks, TOKEN_SLOTS, x)
    got, hlo = _step(block, stacks, x, factor, monkeypatch)
    np.testing.assert_allclose(got[REAL], want[REAL], rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    assert not got[~REAL].any()
    # The dispatch runs (the step's program holds both paths; the overflow picks at run
    # time): rows, weights, expert ids, the 3 projections' masks there, the sums back.
    assert collectives(hlo).get("all-to-all", 0) == 7, collectives(hlo)
    if route == "xla" and factor == 100.0:  # without adapters: no masks travel
        _, base_hlo = _step(block, stacks, x, factor, monkeypatch, adapted=False)
        assert collectives(base_hlo).get("all-to-all", 0) == 4, collectives(base_hlo)
