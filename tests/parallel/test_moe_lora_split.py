"""LoRA experts (lora/slots.LoraExperts) through the Pallas GMM under expert and tensor
parallel (layers/moe.py's shard_map) on the 8 virtual CPU devices, kernels in interpret
mode: the adapter stacks split with the experts, so --enable-lora keeps the hand split.

- a block of experts with every expert adapted, tokens of two slots and of none, placed as
  the engine places experts and stacks (dense experts split over 2; int8 ones over 3, which
  8 experts do not divide, by the intermediate width) gives a float64 numpy reference's
  output (on the dequantized experts); the kernel never sees a whole expert weight and
  the program's only collective is the all-reduce of the [T, D] output;
- int8 and int4 experts split by expert over 2 and 4 devices (tensor parallel alone),
  through the CPU's native expert kernel, the stacks cut on the expert axis with them (as
  LoraSlots.place cuts them): the same reference, no all-gather of stacks or experts;
- a tiny Qwen3-MoE engine at tensor parallel 2, base and three adapters (two of them on
  every expert) mixed in its steps, gives transformers+peft's logits, and its compiled
  LoRA step gathers no expert weight and no expert adapter stack."""

import re
import types

import jax
import numpy as np
import pytest

from tests.helpers import engine_request, run_chunks, save_tiny_family
from tests.parallel.test_collective_matmul import collectives
from tests.parallel.test_moe_expert_parallel import CFG, D, E, T, _dense_block, _int4, _quantized
from tests.helpers import pallas_tpu_gmm_in_interpret_mode
from xla_inference.kernels import cpu_quantized, pallas_gmm
from xla_inference.layers.moe import MoeMlp, moe_mlp, route
from xla_inference.lora.slots import LoraExperts, column_mask, expert_stack_sharding
from xla_inference.parallel.sharding import build_mesh, param_shardings, place_params, traced_over
from xla_inference.quantization.experts import (expert_weights, quantize_experts,
                                                uses_native_kernel)
from xla_inference.quantization.groups import INT4, INT8

SLOTS, RANK = 2, 4  # adapter slots 1..SLOTS, each of rank RANK: L*r = 8 stack columns
F = 48


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    yield from pallas_tpu_gmm_in_interpret_mode(monkeypatch)


def _adapter_stacks(seed=5) -> dict:
    """Every slot's adapters of every expert, laid out as LoraSlots keeps them: A [E, in,
    L*r] (gate and up share theirs: peft's fused gate_up_proj), B [E, L*r, out]."""
    rng = np.random.default_rng(seed)
    cols = SLOTS * RANK
    rand = lambda *shape: (0.3 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    return {"a_gate_up": rand(E, D, cols) / np.sqrt(D), "b_gate": rand(E, cols, F),
            "b_up": rand(E, cols, F), "a_down": rand(E, F, cols) / np.sqrt(F),
            "b_down": rand(E, cols, D)}


def _with_adapters(block: MoeMlp, stacks: dict, token_slots) -> MoeMlp:
    mask = column_mask(token_slots, SLOTS, RANK)
    on = np.bool_(True)  # some token runs an adapter with expert weights
    return MoeMlp(block.router,
                  LoraExperts(block.w_gate, stacks["a_gate_up"], stacks["b_gate"], mask, on),
                  LoraExperts(block.w_up, stacks["a_gate_up"], stacks["b_up"], mask, on),
                  LoraExperts(block.w_down, stacks["a_down"], stacks["b_down"], mask, on))


def _reference(block: MoeMlp, stacks: dict, token_slots, x) -> np.ndarray:
    """float64, token by token: each chosen expert's SwiGLU, every projection plus its
    adapter's delta for the token's slot (none for slot 0), weighted by the routing."""
    weights, experts = (np.asarray(a) for a in jax.jit(route, static_argnums=2)(block, x, CFG))
    f64 = {k: np.asarray(v, np.float64) for k, v in stacks.items()}
    wg, wu, wd = (np.asarray(expert_weights(w, np.float32), np.float64)  # dequantized
                  for w in (block.w_gate, block.w_up, block.w_down))
    out = np.zeros((T, D))
    for t in range(T):
        s, xt = int(token_slots[t]), np.asarray(x[t], np.float64)
        cols = slice((s - 1) * RANK, s * RANK)

        def project(v, w, a, b, e):
            return v @ w[e] + ((v @ f64[a][e][:, cols]) @ f64[b][e][cols] if s else 0.0)

        for j, e in enumerate(experts[t]):
            gate = project(xt, wg, "a_gate_up", "b_gate", e)
            up = project(xt, wu, "a_gate_up", "b_up", e)
            h = gate / (1 + np.exp(-gate)) * up
            out[t] += weights[t, j] * project(h, wd, "a_down", "b_down", e)
    return out


def _placed_stacks(stacks: dict, shardings: MoeMlp) -> dict:
    """The stacks placed by the engine's own rule (lora/slots.expert_stack_sharding, which
    LoraSlots.place applies) beside experts of `shardings` (param_shardings'): beside
    dense experts of spec (e, i, o) A [E, in, L*r] as (e, i, None), B [E, L*r, out] as
    (e, None, o); beside quantized experts by their values' expert axis alone."""
    return jax.device_put(stacks, {
        "a_gate_up": expert_stack_sharding(shardings.w_gate, True),
        "b_gate": expert_stack_sharding(shardings.w_gate, False),
        "b_up": expert_stack_sharding(shardings.w_up, False),
        "a_down": expert_stack_sharding(shardings.w_down, True),
        "b_down": expert_stack_sharding(shardings.w_down, False)})


@pytest.fixture
def handed(monkeypatch):
    """The weight shape every gmm call is handed, as traced."""
    shapes = []

    def recording(lhs, w, *args, _kernel=pallas_gmm.gmm, **kwargs):
        shapes.append(tuple(w.shape))
        return _kernel(lhs, w, *args, **kwargs)
    monkeypatch.setattr(pallas_gmm, "gmm", recording)
    return shapes


# (tp, GMM backend, the axis of gate / up / down the split cuts, experts): dense experts
# split over 2; int8 (K-major) over 3, which 8 experts do not divide: the width.
@pytest.mark.parametrize("tp,backend,axes,kind", [(2, "tpu", (0, 0, 0), "float32"),
                                                  (3, "gpu", (2, 2, 1), INT8)],
                         ids=["experts_split", "int8_width_split"])
def test_adapted_experts_on_their_shares_equal_reference(tp, backend, axes, kind, handed,
                                                         monkeypatch):
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, backend)
    block, stacks = _dense_block(), _adapter_stacks()
    block = block if kind == "float32" else _quantized(block, kind)
    x = np.random.default_rng(1).standard_normal((T, D)).astype(np.float32)
    token_slots = np.array([0, 1, 2, 1, 0, 2, 2, 1, 0, 1, 2, 0], np.int32)
    want = _reference(block, stacks, token_slots, x)

    mesh = build_mesh(tp)
    model_cfg = types.SimpleNamespace(moe=CFG, intermediate_size=F)
    shardings = param_shardings(block, model_cfg, mesh)
    placed = place_params(block, shardings)
    values = lambda w: w if kind == "float32" else w.values  # noqa: E731
    for name, axis in zip(("w_gate", "w_up", "w_down"), axes):
        assert values(getattr(placed, name)).sharding.spec[axis] == "model", name
    placed_stacks = _placed_stacks(stacks, shardings)
    step = jax.jit(traced_over(mesh, lambda p, s, slots, x: moe_mlp(
        _with_adapters(p, s, slots), x, CFG))).lower(placed, placed_stacks, token_slots, x)
    compiled = step.compile()
    hlo = compiled.as_text()
    got = np.asarray(compiled(placed, placed_stacks, token_slots, x))

    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # The adapters matter here: without them the block gives another output.
    assert np.abs(want - _reference(block, stacks, np.zeros(T, np.int32), x)).max() > 1e-2
    # Each dense base GMM multiplies one device's share, never an expert weight whole.
    whole = [(E, D, F), (E, D, F), (E, F, D)]
    shares = [tuple(d // tp if i == axis else d for i, d in enumerate(shape))
              for shape, axis in zip(whole, axes)]
    assert kind != "float32" or set(shares) <= set(handed), handed
    assert not set(whole) & set(handed), handed
    # Nothing gathered; base and adapter partial outputs meet in one all-reduce of [T, D].
    assert collectives(hlo) == {"all-reduce": 1}, collectives(hlo)
    assert re.search(rf"f32\[{T},{D}\]\S* all-reduce\(", hlo)


# Quantized experts split by expert under tensor parallel alone (E divisible by the axis),
# through the CPU's native expert kernel (its tiles split only by experts): the stacks
# placed beside them cut on the expert axis with the experts' values, each device's delta
# on its own experts' adapters; nothing of the stacks gathered.
@pytest.mark.parametrize("kind,tp", [(INT8, 2), (INT4, 4)])
def test_quantized_experts_split_by_expert_with_adapters_equal_reference(kind, tp,
                                                                         monkeypatch):
    monkeypatch.setenv("XLA_INFERENCE_CPU_QUANTIZED", "1")
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, "xla")
    monkeypatch.setenv("XLA_INFERENCE_MOE_DISPATCH", "auto")
    jax.clear_caches()
    cpu_quantized.available.cache_clear()
    dense, stacks = _dense_block(), _adapter_stacks()
    experts = ([_int4(E, D, F, 0), _int4(E, D, F, 100), _int4(E, F, D, 200)] if kind == INT4
               else [quantize_experts(w, kind) for w in (dense.w_gate, dense.w_up, dense.w_down)])
    block = MoeMlp(dense.router, *experts)
    assert all(uses_native_kernel(w) for w in experts), "the native CPU kernel did not build"
    x = np.random.default_rng(1).standard_normal((T, D)).astype(np.float32)
    token_slots = np.array([0, 1, 2, 1, 0, 2, 2, 1, 0, 1, 2, 0], np.int32)
    want = _reference(block, stacks, token_slots, x)

    mesh = build_mesh(tp)
    shardings = param_shardings(block, types.SimpleNamespace(moe=CFG, intermediate_size=F), mesh)
    placed = place_params(block, shardings)
    placed_stacks = _placed_stacks(stacks, shardings)
    for name in ("w_gate", "w_up", "w_down"):
        assert getattr(placed, name).values.sharding.spec[0] == "model", name
    for name, stack in placed_stacks.items():  # E / tp experts' adapters on each device
        assert tuple(stack.sharding.spec) == ("model",), (name, stack.sharding)
        assert {s.data.shape for s in stack.addressable_shards} == {
            (E // tp, *stack.shape[1:])}, name
    step = jax.jit(traced_over(mesh, lambda p, s, slots, x: moe_mlp(
        _with_adapters(p, s, slots), x, CFG))).lower(placed, placed_stacks, token_slots, x)
    compiled = step.compile()
    got = np.asarray(compiled(placed, placed_stacks, token_slots, x))

    # The kernel rounds each activation row to 15-bit integers: ~1e-4 relative.
    np.testing.assert_allclose(got, want, rtol=5e-4, atol=5e-4 * np.abs(want).max())
    assert np.abs(want - _reference(block, stacks, np.zeros(T, np.int32), x)).max() > 1e-2
    # No all-gather (of the stacks or the experts): one all-reduce of the [T, D] output.
    hlo = compiled.as_text()
    assert collectives(hlo) == {"all-reduce": 1}, collectives(hlo)
    assert re.search(rf"f32\[{T},{D}\]\S* all-reduce\(", hlo)


# ------------------------------------------------------------------ through the engine

@pytest.mark.slow  # adapters saved by peft, Pallas in interpret mode: ~32 s
def test_qwen3_moe_expert_adapters_at_tp2_match_peft_without_gathers(tmp_path):
    from tests.lora.lora_helpers import peft_logits, save_adapter
    from tests.lora.test_lora_engine import PROMPTS, add, lora_engine
    from tests.lora.test_lora_moe import moe_adapters
    from xla_inference.runner.requests import build_step_batch

    model_dir = save_tiny_family(tmp_path / "model", "qwen3_moe")
    paths = [None] + [save_adapter(model_dir, tmp_path / name, seed=20 + i, **fields)
                      for i, (name, fields) in enumerate(moe_adapters("qwen3_moe"))]
    engine = lora_engine(model_dir, mesh=build_mesh(2))
    moe = engine.params.layers[1].mlp
    assert moe.w_gate.sharding.spec[0] == "model"  # the experts split over the 2 devices
    for i, path in enumerate(paths[1:], start=1):
        add(engine, i, path)
    reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(PROMPTS)]
    for i, req in enumerate(reqs):
        req.lora_id = i
    # Prefill all but two tokens of every prompt in one step, then two one-token steps:
    # base and the three adapters mixed in each step.
    plan = [{i: len(p) - 2 for i, p in enumerate(PROMPTS)}] + [{i: 1 for i in range(4)}] * 2
    rows = run_chunks(engine, reqs, plan)
    for i, (prompt, path) in enumerate(zip(PROMPTS, paths)):
        want = peft_logits(model_dir, path, prompt)
        for pos in range(len(prompt) - 3, len(prompt)):
            np.testing.assert_allclose(rows[(f"r{i}", pos)], want[pos], atol=2e-4, rtol=0,
                                       err_msg=f"adapter {path} position {pos}")

    # The compiled LoRA step of 4 tokens: no all-gather of anything stacked by expert.
    scheduled = [(engine_request(f"h{i}", [3, 4, 5], 1 + 8 * i), 1) for i in range(4)]
    for i, (req, _) in enumerate(scheduled):
        req.lora_id = i
    batch = build_step_batch(scheduled, engine.layout_for(4))
    slots = engine._token_slots(scheduled, batch.num_tokens)
    assert slots.any()
    hlo = engine.lower_step(batch, token_slots=slots).compile().as_text()
    assert "all-reduce" in collectives(hlo)
    gathered = re.findall(rf"f32\[{E},\d+,\d+\]\S* all-gather\(", hlo)
    assert gathered == [], gathered
