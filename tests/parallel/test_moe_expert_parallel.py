"""The MoE experts through the Pallas GMM under expert and tensor parallel (layers/moe.py's
shard_map) on the 8 virtual CPU devices, the kernels in interpret mode:

- a block of dense, int8, FP8 and 4-bit experts placed as parallel/sharding.py places them
  (experts split over 2 and 4 devices; over 3, which 8 experts do not divide, the
  intermediate width) gives the float reference's output (every expert on every token,
  dequantized: moe_mlp_dense on one device); the kernel is handed each device's share
  only, and the compiled program gathers nothing: one all-reduce of the [T, D] output;
- left to GSPMD (no mesh in the trace) the same block gathers the experts whole;
- a tiny Qwen3-MoE's engine steps under tensor parallel 2 (experts split) give the
  one-device default path's logits (ragged_dot, native CPU kernels), and the compiled
  step gathers no expert weight."""

import re
import types

import jax
import numpy as np
import pytest

from tests.helpers import engine_request, run_chunks, save_tiny_family, tiny_engine
from tests.parallel.test_collective_matmul import collectives
from tests.quantization.test_packed import random_group_quant
from tests.helpers import pallas_tpu_gmm_in_interpret_mode
from xla_inference.kernels import pallas_gmm
from xla_inference.layers.moe import MoeConfig, MoeMlp, moe_mlp, moe_mlp_dense
from xla_inference.parallel.sharding import build_mesh, param_shardings, place_params, traced_over
from xla_inference.quantization.experts import pack_experts, quantize_experts, stored_for_step
from xla_inference.quantization.groups import FP8, INT4, INT8
from xla_inference.quantization.packed import K_MAJOR
from xla_inference.runner.requests import build_step_batch

E, D, T = 8, 64, 12
CFG = MoeConfig(num_experts=E, num_experts_per_tok=2, intermediate_size=48, norm_topk_prob=True)
# Llama 4's routing: sigmoid weights that scale each token before its experts.
WEIGHTED_INPUTS = MoeConfig(num_experts=E, num_experts_per_tok=2, intermediate_size=48,
                            norm_topk_prob=False, scoring="sigmoid", weight_inputs=True)


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    yield from pallas_tpu_gmm_in_interpret_mode(monkeypatch)


def _dense_block(num_experts=E, F=48, seed=0) -> MoeMlp:
    rng = np.random.default_rng(seed)
    scaled = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[1])  # noqa: E731
                             ).astype(np.float32)
    return MoeMlp(router=scaled(D, num_experts) * 4, w_gate=scaled(num_experts, D, F),
                  w_up=scaled(num_experts, D, F), w_down=scaled(num_experts, F, D))


def _int4(num_experts, inp, out, seed):
    """GPTQ-like 4-bit experts of logical [E, in, out]: groups of 16, offsets."""
    return pack_experts([random_group_quant(INT4, out, inp, 16, seed=seed + e, half_values=True)
                         for e in range(num_experts)])


def _quantized(dense: MoeMlp, kind: str) -> MoeMlp:
    """dense's experts quantized (K-major, as the loader stores them for the Pallas GMM)."""
    ws = (dense.w_gate, dense.w_up, dense.w_down)
    if kind == INT4:
        E_, F = dense.w_gate.shape[0], dense.w_gate.shape[2]
        packed = [_int4(E_, D, F, 0), _int4(E_, D, F, 100), _int4(E_, F, D, 200)]
    else:
        packed = [quantize_experts(w, kind) for w in ws]
    packed = [stored_for_step(w) for w in packed]
    assert all(w.layout == K_MAJOR for w in packed)
    return MoeMlp(dense.router, *packed)


@pytest.fixture
def handed(monkeypatch):
    """The weight (values) shape every gmm / gmm_quantized call is handed, as traced."""
    shapes = []
    for name in ("gmm", "gmm_quantized"):
        kernel = getattr(pallas_gmm, name)

        def recording(lhs, w, *args, _kernel=kernel, **kwargs):
            shapes.append(w.shape)
            return _kernel(lhs, w, *args, **kwargs)
        monkeypatch.setattr(pallas_gmm, name, recording)
    return shapes


def _on_mesh(block: MoeMlp, x, tp: int, cfg: MoeConfig = CFG):
    """moe_mlp traced over a tensor-parallel mesh of tp devices, block placed as the engine
    places parameters: (output, compiled HLO, the placed block)."""
    mesh = build_mesh(tp)
    model_cfg = types.SimpleNamespace(moe=cfg, intermediate_size=block.w_gate.shape[2])
    placed = place_params(block, param_shardings(block, model_cfg, mesh))
    step = jax.jit(traced_over(mesh, lambda p, x: moe_mlp(p, x, cfg))).lower(placed, x).compile()
    return step(placed, x), step.as_text(), placed


# (experts, tp, GMM backend): experts split over 2 and 4 devices, the width over 3 (a
# per-channel int8 down projection: its single group's scales go whole to each device);
# FP8 with Llama 4's routing (the inputs weighted before the experts).
CASES = [("float32", 2, "tpu", CFG), ("float32", 3, "gpu", CFG), (INT8, 3, "gpu", CFG),
         (FP8, 4, "gpu", WEIGHTED_INPUTS), (INT4, 2, "gpu", CFG)]


@pytest.mark.parametrize("kind,tp,backend,cfg", CASES)
def test_block_on_its_shares_equals_reference_without_gathers(kind, tp, backend, cfg, handed,
                                                              monkeypatch):
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, backend)
    dense = _dense_block(F=64 if kind == INT4 else 48)  # 4 bits: whole 2H blocks
    block = dense if kind == "float32" else _quantized(dense, kind)
    x = np.random.default_rng(1).standard_normal((T, D)).astype(np.float32)
    want = np.asarray(jax.jit(moe_mlp_dense, static_argnums=2)(block, x, cfg))
    handed.clear()
    got, hlo, placed = _on_mesh(block, x, tp, cfg)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    values = lambda w: w if kind == "float32" else w.values  # noqa: E731
    split_experts = E % tp == 0
    for name in ("w_gate", "w_up", "w_down"):
        spec = values(getattr(placed, name)).sharding.spec
        want_axis = 0 if split_experts else (1 if name == "w_down" else 2)
        assert spec[want_axis] == "model", (name, spec)
    # Each GMM multiplies one device's share: E / tp experts, or F / tp of the width.
    whole = [values(getattr(block, name)).shape for name in ("w_gate", "w_up", "w_down")]
    axes = (0, 0, 0) if split_experts else (2, 2, 1)
    shares = [tuple(d // tp if i == axis else d for i, d in enumerate(shape))
              for shape, axis in zip(whole, axes)]
    assert handed == shares, (handed, shares)
    # Nothing gathered; the partial outputs meet in one all-reduce of [T, D].
    assert collectives(hlo) == {"all-reduce": 1}, collectives(hlo)
    assert re.search(rf"f32\[{T},{D}\]\S* all-reduce\(", hlo)


def test_left_to_gspmd_the_experts_are_gathered():
    """What the split removes: traced without the mesh (no shard_map), the Pallas call has
    no partitioning rule and XLA gathers every expert weight whole onto each device."""
    block = _dense_block()
    x = np.random.default_rng(1).standard_normal((T, D)).astype(np.float32)
    mesh = build_mesh(2)
    model_cfg = types.SimpleNamespace(moe=CFG, intermediate_size=48)
    placed = place_params(block, param_shardings(block, model_cfg, mesh))
    hlo = jax.jit(lambda p, x: moe_mlp(p, x, CFG)).lower(placed, x).compile().as_text()
    gathered = re.findall(r"f32\[8,(?:64,48|48,64)\]\S* all-gather\(", hlo)
    assert len(gathered) == 3, collectives(hlo)


# ------------------------------------------------------------------ through the engine

PROMPTS = [[5, 9, 14, 3, 77, 21, 40, 8], list(range(20, 34)), [101, 7, 66]]
PLAN = [{0: 7, 1: 5}, {0: 1, 1: 9, 2: 3}]  # prefill (one chunked), then a mixed step


def _engine_logits(model_dir, mesh=None):
    jax.clear_caches()  # the route is read when a layer is traced
    engine = tiny_engine(model_dir, mesh=mesh)
    reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(PROMPTS)]
    return engine, run_chunks(engine, reqs, PLAN)


def _expert_gathers(engine) -> list[str]:
    """all-gathers in a compiled 12-token step whose result has an expert weight's whole
    [E, D, F] or [E, F, D] shape."""
    req = engine_request("hlo", list(range(3, 15)), 1)
    batch = build_step_batch([(req, 12)], engine.layout_for(12))
    hlo = engine.lower_step(batch).compile().as_text()
    assert "all-reduce" in collectives(hlo)
    return re.findall(r"\[8,(?:64,48|48,64)\]\S* all-gather\(", hlo)


@pytest.mark.slow
def test_qwen3_moe_steps_split_equal_one_device_native(tmp_path, monkeypatch):
    model_dir = save_tiny_family(tmp_path / "m", "qwen3_moe")
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, "xla")  # the CPU's default path
    _, want = _engine_logits(model_dir)
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, "tpu")
    # Experts split over 2 (the width split through the engine: tests/kernels/
    # test_moe_kmajor_step.py's int8 experts over 3 devices).
    engine, got = _engine_logits(model_dir, build_mesh(2))
    assert got.keys() == want.keys()
    for key, row in want.items():
        np.testing.assert_allclose(got[key], row, rtol=1e-4, atol=1e-4, err_msg=str(key))
    moe = next(layer.mlp for layer in engine.params.layers if hasattr(layer.mlp, "router"))
    assert moe.w_gate.sharding.spec[0] == "model", moe.w_gate.sharding.spec
    assert _expert_gathers(engine) == []
