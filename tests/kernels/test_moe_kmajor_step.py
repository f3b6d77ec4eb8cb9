"""Quantized MoE experts stored at load in the Pallas kernels' K-major layout
(quantization/experts.stored_for_step, called by loading/params.pack_quantized) and handed
to the grouped matmul unchanged in every step.

- The load decision: K_MAJOR only where the Pallas GMM will serve the experts (its route,
  its shapes, not the native CPU kernel); the stored layout holds every value (dequantized
  equal to the tiles, exactly), and the XLA paths (every expert dequantized, each row's
  expert gathered) give the same products from either layout.
- No relayout in the step: in the MoE block's jaxpr every pallas_call takes the stored
  expert arrays as they enter the step (a data-flow check that catches a conversion in the
  step: shown on the old in-step conversion).
- Through the engine (Pallas TPU kernels in interpret mode, CPU kernel off): a tiny
  Qwen3-MoE with online int8 and GPTQ 4-bit experts gives the XLA path's logits and the
  float64 transformers logits of the dequantized checkpoint; expert parallel over 4 virtual
  devices and tensor parallel over the intermediate axis on 3 give the one-device logits."""

import dataclasses
import functools

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import engine_request, run_chunks, save_tiny_family
from tests.quantization.test_moe_quantized import _engine, _moe_layer, save_gptq_moe
from tests.quantization.test_online import save_dequantized
from tests.quantization.test_packed import random_group_quant
from xla_inference.kernels import cpu_quantized, pallas_gmm
from xla_inference.kernels import pallas_quantized_matmul as qmm
from xla_inference.layers.moe import MoeConfig, MoeMlp, moe_mlp
from xla_inference.quantization import experts as experts_module
from xla_inference.quantization.experts import (PackedExperts, dequantize_experts, pack_experts,
                                                ragged_product, stored_for_step)
from xla_inference.quantization.groups import FP8, INT4, INT8
from xla_inference.quantization.packed import K_MAJOR, OUT_IN

E, D, F = 8, 64, 96
KINDS = {"int4-g16-offsets": (INT4, 16, True), "int8-channel": (INT8, None, False),
         "fp8-channel": (FP8, None, False)}


def _cpu_kernel_off(mp) -> None:
    """The native CPU kernel off (it would keep the tiles and serve the experts itself);
    cpu_quantized.available() caches its answer: asked again."""
    mp.setenv("XLA_INFERENCE_CPU_QUANTIZED", "0")
    cpu_quantized.available.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_choices():
    """Each test reads the kernel choices afresh and leaves none behind (the route is read
    when a layer is traced; available() is cached)."""
    jax.clear_caches()
    cpu_quantized.available.cache_clear()
    yield
    jax.clear_caches()
    cpu_quantized.available.cache_clear()


@pytest.fixture
def pallas_tpu(monkeypatch):
    """The Pallas TPU GMM in interpret mode, the native CPU kernel off."""
    _cpu_kernel_off(monkeypatch)
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, "tpu")


def _stack(name, inp, out, seed=0) -> PackedExperts:
    kind, group, offsets = KINDS[name]
    return pack_experts([random_group_quant(kind, out, inp, group or inp, offsets=offsets,
                                            seed=seed + e) for e in range(E)])


# ------------------------------------------------------------------ the load decision

@pytest.mark.parametrize("name", KINDS)
def test_stored_layout_keeps_every_value(name, pallas_tpu):
    tiles = _stack(name, D, F)
    stored = stored_for_step(tiles)
    assert stored.layout == K_MAJOR and not stored.tiled
    rows = D // 2 if tiles.kind == INT4 else D
    assert stored.values.shape == (E, rows, F) and stored.scales.shape[::2] == (E, F)
    np.testing.assert_array_equal(np.asarray(dequantize_experts(stored, jnp.float32)),
                                  np.asarray(dequantize_experts(tiles, jnp.float32)))
    assert stored_for_step(stored) is stored  # once


def test_layout_chosen_where_the_pallas_gmm_serves(monkeypatch):
    tiles = _stack("int8-channel", D, F)
    monkeypatch.delenv(pallas_gmm.GMM_BACKEND_VARIABLE, raising=False)
    assert stored_for_step(tiles) is tiles  # the CPU: no Pallas route
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, "tpu")
    assert stored_for_step(tiles) is tiles  # the native CPU kernel serves (reads the tiles)
    _cpu_kernel_off(monkeypatch)
    assert stored_for_step(tiles).layout == K_MAJOR
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, "xla")
    assert stored_for_step(tiles) is tiles  # the GMM's own switch
    # 4 bits, K = 48 in groups of 32: not whole nibble blocks for the kernel
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, "tpu")
    odd = pack_experts([random_group_quant(INT4, F, 48, 16, seed=e) for e in range(E)])
    assert not qmm.layout_supported(48, F, bits=4, group_size=16, backend="tpu")
    assert stored_for_step(odd) is odd


@pytest.mark.parametrize("rows", [3, 20])  # gathered rows; every expert dequantized
@pytest.mark.parametrize("name", ["int4-g16-offsets", "fp8-channel"])
def test_xla_paths_take_either_layout(name, rows, monkeypatch):
    """The products that dequantize in XLA read K_MAJOR experts as well as the tiles,
    against float64 numpy."""
    _cpu_kernel_off(monkeypatch)
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, "xla")
    tiles = _stack(name, D, F)
    stored = experts_module.to_kernel_layout(tiles)
    sizes = np.bincount(np.random.default_rng(rows).integers(0, E, rows), minlength=E)
    xs = np.random.default_rng(1).standard_normal((rows, D)).astype(np.float32)
    dense = np.asarray(dequantize_experts(tiles, jnp.float32)).astype(np.float64)
    want = np.concatenate([xs[s:s + n] @ dense[e] for e, (s, n) in
                           enumerate(zip(np.cumsum(sizes) - sizes, sizes))])
    for w in (tiles, stored):
        got = jax.jit(ragged_product)(jnp.asarray(xs), jax.tree.map(jnp.asarray, w),
                                      jnp.asarray(sizes, jnp.int32))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ------------------------------------------------------------------ no relayout in the step

def _pallas_weight_sources(fn, *args) -> list[list[str | None]]:
    """For every pallas_call in fn's jaxpr (nested calls followed): the input leaf (its
    key path in args) each operand is, unchanged, or None where an equation made it."""
    closed = jax.make_jaxpr(fn)(*args)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(args)[0]]
    found = []

    def walk(jaxpr, sources):
        for eqn in jaxpr.eqns:
            names = [sources.get(v) if isinstance(v, jex_core.Var) else None
                     for v in eqn.invars]
            if eqn.primitive.name == "pallas_call":
                found.append(names)
                continue
            for param in eqn.params.values():
                sub = getattr(param, "jaxpr", param)
                if isinstance(sub, jex_core.Jaxpr) and len(sub.invars) == len(eqn.invars):
                    walk(sub, dict(zip(sub.invars, names)))  # a call: operands pass through

    walk(closed.jaxpr, dict(zip(closed.jaxpr.invars, paths)))
    return found


CFG = MoeConfig(num_experts=E, num_experts_per_tok=2, intermediate_size=F, norm_topk_prob=True)


def _block(name, seed=0) -> MoeMlp:
    router = np.random.default_rng(seed).standard_normal((D, E)).astype(np.float32)
    return MoeMlp(jnp.asarray(router), _stack(name, D, F, seed), _stack(name, D, F, seed + 10),
                  _stack(name, F, D, seed + 20))


def _expert_operands(sources) -> set[str]:
    """The expert stacks (key paths) among a pallas_call's operands."""
    return {s.rsplit(".", 1)[0] for s in sources if s is not None and ".w_" in s}


@pytest.mark.parametrize("name", ["int4-g16-offsets", "int8-channel"])
def test_step_hands_the_stored_experts_to_the_kernel(name, pallas_tpu):
    block = _block(name)
    stored = dataclasses.replace(block, **{w: stored_for_step(getattr(block, w))
                                           for w in ("w_gate", "w_up", "w_down")})
    assert all(getattr(stored, w).layout == K_MAJOR for w in ("w_gate", "w_up", "w_down"))
    x = jnp.ones((12, D), jnp.float32)  # 24 rows >= 8 experts: the GMM
    calls = _pallas_weight_sources(lambda p, x: moe_mlp(p, x, CFG), stored, x)
    assert len(calls) == 3
    for call, w in zip(calls, ("w_gate", "w_up", "w_down")):
        arrays = {f"[0].{w}.{a}" for a in ("values", "scales", "offsets")
                  if getattr(getattr(stored, w), a) is not None}
        assert arrays <= set(call), (w, call)  # every stored array, as it entered the step
        assert _expert_operands(call) == {f"[0].{w}"}

    # The check sees a conversion in the step (what the step did before: the tiles
    # converted per call by accelerator_layout).
    def converted_in_step(p, x):
        def convert(w):
            layout = functools.partial(qmm.accelerator_layout, bits=w.bits,
                                       in_features=w.in_features, out_features=w.out_features)
            values, scales, offsets = jax.vmap(layout)(w.values, w.scales, w.offsets)
            return dataclasses.replace(w, values=values, scales=scales, offsets=offsets,
                                       layout=K_MAJOR)
        return moe_mlp(dataclasses.replace(p, w_gate=convert(p.w_gate)), x, CFG)

    first = _pallas_weight_sources(converted_in_step, block, x)[0]
    assert "[0].w_gate.values" not in first and "[0].w_gate.scales" not in first


# ------------------------------------------------------------------ through the engine

# One step: three prompts, one of them chunked (15 tokens: 30 rows, every expert through
# the GMM; one compiled bucket keeps the interpret-mode kernels' compile time down).
PLAN = [{0: 5, 1: 4, 2: 6}]
PROMPT_LENGTHS = (5, 9, 6)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Qwen3-MoE whose experts are F = 96 wide (the 4-bit kernel takes 96 inputs in
    groups of 16; 3 devices split it), its GPTQ 4-bit checkpoint and the float checkpoints
    holding the dequantized values of each scheme."""
    base = tmp_path_factory.mktemp("moe-kmajor")
    src = save_tiny_family(base / "m", "qwen3_moe", moe_intermediate_size=F)
    gptq, gptq_ref = save_gptq_moe(src, base / "gptq")
    return {"int8": (src, "int8", save_dequantized(src, base / "int8-ref", INT8)),
            "gptq": (gptq, None, gptq_ref)}


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 128, size=n).tolist() for n in PROMPT_LENGTHS]


def _run(checkpoint, quantization, mesh=None):
    jax.clear_caches()  # decoder._layer's jit outlives engines; the route is read at trace
    model, engine = _engine(checkpoint, quantization, mesh)
    reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(_prompts())]
    return engine, run_chunks(engine, reqs, PLAN)


@functools.lru_cache(maxsize=2)
def _float64_model(ref):
    import torch
    import transformers

    # Eager experts: the grouped kernel transformers picks takes no float64.
    return transformers.AutoModelForCausalLM.from_pretrained(
        ref, dtype=torch.float64, experts_implementation="eager").eval()


def _float64_logits(ref, prompt) -> np.ndarray:
    import torch

    with torch.no_grad():
        return _float64_model(ref)(torch.tensor([prompt])).logits[0].numpy()


@pytest.fixture(scope="module")
def pallas_runs(checkpoints):
    """Each scheme's (engine, logits, the values' shapes gmm_quantized was handed) through
    the Pallas GMM on one device."""
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        _cpu_kernel_off(mp)
        mp.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, "tpu")
        kernel, handed = pallas_gmm.gmm_quantized, []

        def recording(lhs, values, *args, **kwargs):
            handed.append(values.shape)
            return kernel(lhs, values, *args, **kwargs)

        mp.setattr(pallas_gmm, "gmm_quantized", recording)
        for scheme, (path, online, _) in checkpoints.items():
            handed.clear()
            runs[scheme] = (*_run(path, online), list(handed))
    jax.clear_caches()
    cpu_quantized.available.cache_clear()
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "gptq"])
def test_quantized_moe_step_equals_xla_and_float64(checkpoints, pallas_runs, scheme,
                                                   monkeypatch):
    path, online, ref = checkpoints[scheme]
    engine, got, handed = pallas_runs[scheme]
    moe = _moe_layer(engine.params)
    for w in (moe.w_gate, moe.w_up, moe.w_down):
        assert w.layout == K_MAJOR and w.kind == (INT8 if scheme == "int8" else INT4)
    # One MoE layer (layer 0 is dense), its three products, each on the stored values.
    assert handed == [w.values.shape for w in (moe.w_gate, moe.w_up, moe.w_down)]
    _cpu_kernel_off(monkeypatch)
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, "xla")
    xla_engine, want = _run(path, online)
    assert _moe_layer(xla_engine.params).w_gate.layout == OUT_IN
    assert got.keys() == want.keys()
    prompts = _prompts()
    reference = [_float64_logits(ref, p) for p in prompts]
    for (rid, pos), logits in got.items():
        np.testing.assert_allclose(logits, want[(rid, pos)], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(logits, reference[int(rid[1:])][pos], rtol=2e-3, atol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("scheme,tp", [("gptq", 4), ("int8", 3)])
def test_expert_and_tensor_parallel_equal_one_device(checkpoints, pallas_runs, pallas_tpu,
                                                     scheme, tp):
    """8 experts over 4 devices: 2 each; over 3 they do not split, the intermediate axis
    (96) does: w_gate's outputs, w_down's inputs."""
    from xla_inference.parallel.sharding import build_mesh

    path, online, _ = checkpoints[scheme]
    engine, got = _run(path, online, build_mesh(tp))
    _, want, _ = pallas_runs[scheme]
    for key, row in want.items():
        np.testing.assert_allclose(got[key], row, rtol=1e-4, atol=1e-4)
    moe = _moe_layer(engine.params)
    assert moe.w_gate.layout == K_MAJOR
    split_axis = 0 if tp == 4 else 2  # experts, or w_gate's [E, D, F] outputs
    for arr in (moe.w_gate.values, moe.w_gate.scales):
        assert arr.sharding.spec[split_axis] == "model", arr.sharding.spec
    assert moe.w_down.values.sharding.spec[1 if tp == 3 else 0] == "model"
