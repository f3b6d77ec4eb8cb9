"""The CPU's native quantized expert kernel (an FFI custom call, no partitioning rule) under
expert parallel on the 8 virtual CPU devices: layers/moe.py splits it by hand as it splits
the Pallas GMM, each device's kernel on its own experts' packed bytes, the partial sums in
one all-reduce; equal to the dequantized float reference. Left to GSPMD (no mesh in the
trace) the same block gathers every expert's packed bytes onto each device."""

import re
import types

import jax
import numpy as np
import pytest

from tests.parallel.test_collective_matmul import collectives
from tests.parallel.test_moe_expert_parallel import CFG, D, E, T, _dense_block
from xla_inference.kernels import cpu_quantized, pallas_gmm
from xla_inference.layers.moe import MoeMlp, moe_mlp, moe_mlp_dense
from xla_inference.parallel.sharding import build_mesh, param_shardings, place_params, traced_over
from xla_inference.quantization.experts import quantize_experts, uses_native_kernel
from xla_inference.quantization.groups import INT8


@pytest.fixture(autouse=True)
def _native_kernel(monkeypatch):
    monkeypatch.setenv("XLA_INFERENCE_CPU_QUANTIZED", "1")
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, "xla")
    monkeypatch.setenv("XLA_INFERENCE_MOE_DISPATCH", "auto")
    jax.clear_caches()
    cpu_quantized.available.cache_clear()
    yield
    jax.clear_caches()
    cpu_quantized.available.cache_clear()


def _int8_block() -> MoeMlp:
    dense = _dense_block()
    block = MoeMlp(dense.router, *(quantize_experts(w, INT8)
                                   for w in (dense.w_gate, dense.w_up, dense.w_down)))
    assert all(uses_native_kernel(w) for w in (block.w_gate, block.w_up, block.w_down)), \
        "the native CPU quantized kernel did not build"
    return block


def _placed(block, tp):
    mesh = build_mesh(tp)
    model_cfg = types.SimpleNamespace(moe=CFG, intermediate_size=48)
    return mesh, place_params(block, param_shardings(block, model_cfg, mesh))


def _expert_gathers(hlo: str) -> list[str]:
    """all-gathers whose result has the whole stack's leading E experts."""
    return re.findall(rf"\w+\[{E},[0-9,]+\]\S* all-gather\(", hlo)


@pytest.mark.parametrize("tp", [2, 4])
def test_native_expert_kernel_split_by_experts(tp):
    block = _int8_block()
    x = np.random.default_rng(1).standard_normal((T, D)).astype(np.float32)
    want = np.asarray(jax.jit(moe_mlp_dense, static_argnums=2)(block, x, CFG))
    mesh, placed = _placed(block, tp)
    assert placed.w_gate.values.sharding.spec[0] == "model"
    step = jax.jit(traced_over(mesh, lambda p, x: moe_mlp(p, x, CFG))).lower(placed, x).compile()
    # The kernel rounds each activation row to 15-bit integers: ~1e-4 relative.
    np.testing.assert_allclose(np.asarray(step(placed, x)), want, rtol=5e-4,
                               atol=5e-4 * np.abs(want).max())
    hlo = step.as_text()
    assert _expert_gathers(hlo) == [] and collectives(hlo) == {"all-reduce": 1}, collectives(hlo)


def test_left_to_gspmd_the_native_kernel_gathers_the_experts():
    block = _int8_block()
    x = np.random.default_rng(1).standard_normal((T, D)).astype(np.float32)
    _, placed = _placed(block, 2)
    hlo = jax.jit(lambda p, x: moe_mlp(p, x, CFG)).lower(placed, x).compile().as_text()
    assert _expert_gathers(hlo), collectives(hlo)
