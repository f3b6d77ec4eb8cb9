"""The Pallas GMM in the MoE layers (layers/moe.py for dense experts, quantization/experts.py
for quantized ones), forced on this CPU through XLA_INFERENCE_GMM_BACKEND=tpu / gpu (Pallas
interpret mode; the attention kernel stays the CPU's): a tiny Qwen3-MoE's step logits
equal the default path's (ragged_dot and gathered experts), and blocks of FP8 and 4-bit
experts (dequantized inside the GMM) equal their dense reference. A recording wrapper
around the GMM proves it served the experts' products. The route follows
kernels/backend.py's choice otherwise."""

import jax
import numpy as np
import pytest

from tests.helpers import engine_request, run_chunks, save_tiny_family, tiny_engine
from xla_inference.kernels import cpu_quantized, pallas_gmm
from xla_inference.layers.moe import MoeConfig, MoeMlp, moe_mlp, moe_mlp_dense
from xla_inference.quantization.experts import (PackedExperts, pack_experts, quantize_experts,
                                                stored_for_step)
from xla_inference.quantization.groups import FP8, INT4, GroupQuant
from xla_inference.quantization.packed import K_MAJOR

PROMPTS = [[5, 9, 14, 3, 77, 21, 40, 8], list(range(20, 34)), [101, 7, 66]]
# A prefill of two requests (one chunked), then a mixed step: a single token over its
# cache, the chunked request's rest and a fresh prompt. 12 and 13 tokens, k = 2.
PLAN = [{0: 7, 1: 5}, {0: 1, 1: 9, 2: 3}]


@pytest.fixture
def recorded_gmm(monkeypatch):
    """Every gmm / gmm_quantized call's (name, backend, interpret, rows) while the test runs."""
    calls = []

    def recorder(name):
        kernel = getattr(pallas_gmm, name)

        def recording(lhs, *args, **kwargs):
            calls.append((name, kwargs["backend"], kwargs["interpret"], lhs.shape[0]))
            return kernel(lhs, *args, **kwargs)
        return recording

    for name in ("gmm", "gmm_quantized"):
        monkeypatch.setattr(pallas_gmm, name, recorder(name))
    return calls


def _step_logits(model_dir) -> dict:
    # The route is read when a layer is traced, and decoder._layer's jit outlives engines.
    jax.clear_caches()
    engine = tiny_engine(model_dir)
    reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(PROMPTS)]
    return run_chunks(engine, reqs, PLAN)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    model_dir = save_tiny_family(tmp_path_factory.mktemp("gmm_step") / "m", "qwen3_moe")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(pallas_gmm.GMM_BACKEND_VARIABLE, raising=False)
        assert pallas_gmm.gmm_route() is None  # the CPU: ragged_dot / gathered experts
        return model_dir, _step_logits(model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_qwen3_moe_step_through_gmm_matches_default(qwen3_moe, backend, monkeypatch,
                                                   recorded_gmm):
    model_dir, want = qwen3_moe
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, backend)
    got = _step_logits(model_dir)
    # One MoE layer (layer 0 is dense), three products, traced once (16-token bucket).
    assert recorded_gmm == [("gmm", backend, True, 32)] * 3
    assert got.keys() == want.keys()
    for key, logits in want.items():
        np.testing.assert_allclose(got[key], logits, rtol=1e-4, atol=1e-4, err_msg=str(key))


def _random_block(num_experts=8, D=64, F=64) -> MoeMlp:
    keys = jax.random.split(jax.random.key(0), 4)
    scaled = lambda k, shape: jax.random.normal(k, shape) / np.sqrt(shape[1])  # noqa: E731
    return MoeMlp(router=jax.random.normal(keys[0], (D, num_experts)),
                  w_gate=scaled(keys[1], (num_experts, D, F)),
                  w_up=scaled(keys[2], (num_experts, D, F)),
                  w_down=scaled(keys[3], (num_experts, F, D)))


def _int4_experts(num_experts, inp, out, seed) -> PackedExperts:
    """GPTQ-like 4-bit experts ([E, in, out]): groups of 32, offsets."""
    rng = np.random.default_rng(seed)
    quants = [GroupQuant(rng.integers(0, 16, (out, inp)).astype(np.uint8),
                         rng.uniform(0.01, 0.03, (out, inp // 32)).astype(np.float32),
                         rng.uniform(-0.2, 0.2, (out, inp // 32)).astype(np.float32), INT4, 32)
              for _ in range(num_experts)]
    return pack_experts(quants)


QUANTIZED = {
    "fp8-online": lambda dense: [quantize_experts(np.asarray(w), FP8)
                                 for w in (dense.w_gate, dense.w_up, dense.w_down)],
    "int4-g32-offsets": lambda dense: [_int4_experts(8, 64, 64, seed) for seed in range(3)],
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", QUANTIZED)
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_quantized_experts_through_gmm_equal_dense(backend, kind, monkeypatch, recorded_gmm,
                                                   request):
    """Quantized experts (not the native CPU kernel's: it is turned off), stored in the
    kernel's layout, with at least as many rows as experts: dequantized tile by tile inside
    the GMM."""
    dense = _random_block()
    cfg = MoeConfig(num_experts=8, num_experts_per_tok=2, intermediate_size=64,
                    norm_topk_prob=True)
    x = jax.random.normal(jax.random.key(1), (9, 64))
    monkeypatch.setenv("XLA_INFERENCE_CPU_QUANTIZED", "0")
    cpu_quantized.available.cache_clear()  # cached: asked again (and after the test)
    request.addfinalizer(cpu_quantized.available.cache_clear)
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, backend)
    # Stored in the kernel's layout, as loading/params.pack_quantized stores them.
    block = MoeMlp(dense.router, *map(stored_for_step, QUANTIZED[kind](dense)))
    assert all(w.layout == K_MAJOR for w in (block.w_gate, block.w_up, block.w_down))
    jax.clear_caches()  # the route is read when moe_mlp is traced
    got = jax.jit(moe_mlp, static_argnums=2)(block, x, cfg)
    assert recorded_gmm == [("gmm_quantized", backend, True, 18)] * 3
    want = moe_mlp_dense(block, x, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_route_follows_the_kernel_choice(monkeypatch):
    """The attention backend's device and mode (kernels/backend.py) unless the GMM's own
    variable overrides it."""
    monkeypatch.delenv(pallas_gmm.GMM_BACKEND_VARIABLE, raising=False)
    monkeypatch.setenv("XLA_INFERENCE_PALLAS_INTERPRET", "1")
    for kernels, want in [("pallas-tpu", ("tpu", True)), ("pallas-gpu", ("gpu", True)),
                          ("native", None), ("jnp", None), ("auto", None)]:
        monkeypatch.setenv("XLA_INFERENCE_KERNELS", kernels)
        route = pallas_gmm.gmm_route()
        assert (route and (route.backend, route.interpret)) == want, kernels
    monkeypatch.setenv("XLA_INFERENCE_KERNELS", "pallas-tpu")
    for value, want in [("tpu", ("tpu", True)), ("gpu", ("gpu", True)), ("xla", None)]:
        monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, value)
        route = pallas_gmm.gmm_route()
        assert (route and (route.backend, route.interpret)) == want, value
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, "cuda")
    with pytest.raises(ValueError, match="expected tpu, gpu or xla"):
        pallas_gmm.gmm_route()
