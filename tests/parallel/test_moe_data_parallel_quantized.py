"""Quantized MoE experts under data parallel replicas split across the replicas as dense
ones do (parallel/sharding.expert_spec): values, scales and offsets by expert over every
device of the (data, model) mesh, with --enable-expert-parallel or without (a quantized
stack splits by expert only), and each replica's MoE blocks take every replica's tokens
(layers/moe._routed_across_replicas).

A block of int8 (the native CPU kernel's tiles), fp8 and 4-bit experts nested in the
replicas' shard_map as the engine nests it, each replica its own tokens: each replica's
rows equal the dequantized dense reference, each device holds 2 of the 8 experts, and
nothing of the experts is gathered.

Through the engine (slow): a tiny Qwen3-MoE (8 experts) quantized online to int8 and fp8,
and as a GPTQ 4-bit checkpoint, at DP 2 x TP 2 (2 experts a device): each replica's
requests give the one-device engine's logits and transformers' on the dequantized
weights; every device holds its 2 experts' bytes only, and the compiled step gathers no
quantized expert array."""

import dataclasses
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from tests.helpers import engine_request, hf_logits, run_chunks, save_tiny_family
from tests.quantization.test_moe_quantized import save_gptq_moe
from tests.quantization.test_online import save_dequantized
from xla_inference.layers.moe import MoeMlp, moe_mlp, moe_mlp_dense
from xla_inference.parallel.sharding import (build_mesh, param_shardings, place_params,
                                             replica_local_specs, traced_over)
from xla_inference.quantization.experts import PackedExperts, quantize_experts
from xla_inference.quantization.groups import FP8, INT4, INT8
from xla_inference.quantization.online import ONLINE_METHODS
from xla_inference.runner.build import Precision, build_engine, load
from xla_inference.runner.engine import EngineConfig

PROMPTS = [[5, 9, 14, 3, 77, 21, 40, 8], list(range(20, 34)), [101, 7, 66], list(range(40, 51))]
# 64 pages, 32 per replica: r0 and r2 on replica 0, r1 and r3 on replica 1.
FIRST_PAGES = [1, 33, 9, 41]
PLAN = [{0: 7, 1: 5, 3: 11}, {0: 1, 1: 9, 2: 3}]  # prefill (chunked), then a mixed step
TOL = 2e-3  # against transformers on the dequantized weights (tests/quantization)


def _engine(model_dir, quantization, mesh=None, expert_parallel=False):
    model = load(model_dir, Precision.uniform(jnp.float32), quantization=quantization)
    ecfg = EngineConfig(num_blocks=64, block_size=4, max_num_tokens=32, max_num_seqs=8,
                        max_model_len=128)
    return build_engine(model, ecfg, mesh=mesh, expert_parallel=expert_parallel)


def _logits(engine) -> dict:
    reqs = [engine_request(f"r{i}", p, FIRST_PAGES[i]) for i, p in enumerate(PROMPTS)]
    return run_chunks(engine, reqs, PLAN)


def _expert_gathers(hlo: str, moe) -> list[str]:
    """all-gathers in `hlo` whose result has the shape of a quantized expert array of `moe`
    (values, scales or offsets) but for its number of experts (any: whole, or a cut)."""
    shapes = {tuple(a.shape[1:]) for w in (moe.w_gate, moe.w_up, moe.w_down)
              for a in (w.values, w.scales, w.offsets) if a is not None}
    return [found for shape in shapes for found in re.findall(
        r"\w+\[\d+," + ",".join(map(str, shape)) + r"\]\S* all-gather\(", hlo)]


def _step_hlo(engine) -> str:
    reqs = [engine_request(f"hlo{i}", list(range(3, 15)), FIRST_PAGES[i]) for i in (0, 1)]
    args = engine._replica_batch([(req, 12) for req in reqs])
    return engine.lower_step(*args).compile().as_text()


def _quantized_block(kind):
    """test_moe_expert_parallel's dense block and the same block with its experts quantized
    as `kind` (int4: that module's own int4 experts)."""
    from tests.parallel.test_moe_expert_parallel import D, E, _dense_block, _int4

    dense = _dense_block()
    if kind == INT4:
        experts = [_int4(E, D, 48, 0), _int4(E, D, 48, 100), _int4(E, 48, D, 200)]
    else:
        experts = [quantize_experts(w, kind) for w in (dense.w_gate, dense.w_up, dense.w_down)]
    return dense, MoeMlp(dense.router, *experts)


@pytest.mark.parametrize("kind", [INT8, FP8, INT4])
def test_quantized_block_split_across_replicas_equals_reference(kind):
    from tests.parallel.test_moe_expert_parallel import CFG, D, E

    dense, block = _quantized_block(kind)
    mesh = build_mesh(2, data_parallel_size=2)
    model_cfg = types.SimpleNamespace(moe=CFG, intermediate_size=48)
    # Width preferred (no --enable-expert-parallel): quantized stacks split by expert still.
    shardings = param_shardings(block, model_cfg, mesh, "mlp")
    placed = place_params(block, shardings)
    x = np.random.default_rng(3).standard_normal((2, 13, D)).astype(np.float32)

    def replicas(p, x):
        return jax.shard_map(lambda p, x: moe_mlp(p, x[0], CFG)[None], mesh=mesh,
                             in_specs=(replica_local_specs(shardings), PartitionSpec("data")),
                             out_specs=PartitionSpec("data"), axis_names={"data"},
                             check_vma=False)(p, x)

    step = jax.jit(traced_over(mesh, replicas)).lower(placed, x).compile()
    got = np.asarray(step(placed, x))
    for replica in range(2):
        want = np.asarray(jax.jit(moe_mlp_dense, static_argnums=2)(block, x[replica], CFG))
        np.testing.assert_allclose(got[replica], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for w in (placed.w_gate, placed.w_up, placed.w_down):
        for arr in (w.values, w.scales) + (() if w.offsets is None else (w.offsets,)):
            assert tuple(arr.sharding.spec)[0] == ("data", "model"), arr.sharding.spec
            assert {s.data.shape[0] for s in arr.addressable_shards} == {E // 4}
    assert _expert_gathers(step.as_text(), placed) == []
    jax.clear_caches()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("dp-moe-quantized")
    model_dir = save_tiny_family(base / "qwen3_moe", "qwen3_moe")
    return model_dir, save_gptq_moe(model_dir, base / "gptq")


@pytest.mark.slow  # ~40-90 s a case: two engines, transformers
@pytest.mark.parametrize("method,expert_parallel", [("int8", True), ("fp8", False),
                                                    ("gptq", True)])
def test_quantized_experts_split_across_replicas(checkpoints, tmp_path, method, expert_parallel):
    model_dir, (gptq_dir, gptq_reference) = checkpoints
    if method == "gptq":
        checkpoint, online, reference = gptq_dir, None, gptq_reference
    else:
        checkpoint, online = model_dir, method
        reference = save_dequantized(model_dir, tmp_path / "ref", ONLINE_METHODS[method])
    one_device = _logits(_engine(checkpoint, online))
    engine = _engine(checkpoint, online, build_mesh(2, data_parallel_size=2), expert_parallel)
    moe = next(layer.mlp for layer in engine.params.layers if hasattr(layer.mlp, "router"))
    for w in (moe.w_gate, moe.w_up, moe.w_down):
        assert isinstance(w, PackedExperts)
        for arr in (w.values, w.scales) + (() if w.offsets is None else (w.offsets,)):
            assert tuple(arr.sharding.spec)[0] == ("data", "model"), arr.sharding.spec
            assert {s.data.shape[0] for s in arr.addressable_shards} == {2}  # 8 experts / 4
    got = _logits(engine)
    assert engine.rows_per_replica.tolist() == [3, 3]  # both replicas ran requests
    expected = {i: hf_logits(reference, p) for i, p in enumerate(PROMPTS)}
    for (req_id, position), row in one_device.items():
        # As the expert parallel test of tests/quantization: 15-bit row rounding may flip
        # one step when sums meet in another order; a wrong split moves whole units.
        np.testing.assert_allclose(got[(req_id, position)], row, rtol=1e-4, atol=5e-4)
        np.testing.assert_allclose(got[(req_id, position)],
                                   expected[int(req_id[1:])][position], rtol=TOL, atol=TOL)
    assert _expert_gathers(_step_hlo(engine), moe) == []
    jax.clear_caches()


@pytest.mark.parametrize("kind", [INT8])
def test_adapted_quantized_block_split_across_replicas_equals_reference(kind):
    """LoRA experts over quantized ones (lora/slots.LoraExperts) split across the replicas
    by expert with their adapter stacks, placed as LoraSlots.place places them (their
    experts' expert axis): each replica's tokens, of its own slots, give the float64
    reference on the dequantized experts (tests/parallel/test_moe_lora_split.py; the same
    block on one device: that test); every device holds 2 of the 8 experts' stacks and nothing is gathered."""
    from tests.parallel.test_moe_expert_parallel import CFG, D, E, T
    from tests.parallel.test_moe_lora_split import _adapter_stacks, _reference, _with_adapters
    from xla_inference.lora.slots import column_mask

    dense, block = _quantized_block(kind)
    stacks = _adapter_stacks()
    slots = np.array([[0, 1, 2, 1, 0, 2, 2, 1, 0, 1, 2, 0],
                      [2, 2, 0, 1, 1, 0, 2, 0, 1, 2, 1, 1]], np.int32)  # each replica's
    x = np.random.default_rng(3).standard_normal((2, T, D)).astype(np.float32)
    mesh = build_mesh(2, data_parallel_size=2)
    model_cfg = types.SimpleNamespace(moe=CFG, intermediate_size=48)
    shardings = param_shardings(block, model_cfg, mesh, "mlp")
    placed = place_params(block, shardings)
    # As LoraSlots.place: A [E, in, L*r] and B [E, L*r, out] cut on the experts' expert axis.
    expert_axis = {"a_gate_up": placed.w_gate, "b_gate": placed.w_gate, "b_up": placed.w_up,
                   "a_down": placed.w_down, "b_down": placed.w_down}
    stack_shardings = {name: jax.sharding.NamedSharding(
        mesh, PartitionSpec(tuple(w.values.sharding.spec)[0])) for name, w in expert_axis.items()}
    placed_stacks = jax.device_put(stacks, stack_shardings)
    masks = np.stack([column_mask(s, 2, 4) for s in slots])

    def replicas(p, s, mask, x):
        def one(p, s, mask, x):
            adapted = _with_adapters(p, s, slots[0])  # the stacks and flag; the mask below
            adapted = MoeMlp(adapted.router, *(dataclasses.replace(w, column_mask=mask[0])
                                               for w in (adapted.w_gate, adapted.w_up,
                                                         adapted.w_down)))
            return moe_mlp(adapted, x[0], CFG)[None]

        return jax.shard_map(one, mesh=mesh, in_specs=(
            replica_local_specs(shardings), replica_local_specs(stack_shardings),
            PartitionSpec("data"), PartitionSpec("data")), out_specs=PartitionSpec("data"),
            axis_names={"data"}, check_vma=False)(p, s, mask, x)

    step = jax.jit(traced_over(mesh, replicas)).lower(placed, placed_stacks, masks, x).compile()
    got = np.asarray(step(placed, placed_stacks, masks, x))
    for replica in range(2):
        # int8: the activations' rows are rounded to int8 (W8A8), which float64 is not; a
        # wrong split (an expert or adapter missed or counted twice) moves rows by > 1e-2.
        want = _reference(block, stacks, slots[replica], x[replica])
        np.testing.assert_allclose(got[replica], want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    for arr in placed_stacks.values():
        assert tuple(arr.sharding.spec)[0] == ("data", "model"), arr.sharding.spec
        assert {s.data.shape[0] for s in arr.addressable_shards} == {E // 4}
    assert _expert_gathers(step.as_text(), placed) == []
    stack_shapes = {tuple(a.shape[1:]) for a in stacks.values()}
    assert not [s for s in stack_shapes if re.search(
        r"\w+\[\d+," + ",".join(map(str, s)) + r"\]\S* all-gather\(", step.as_text())]
    jax.clear_caches()
