"""Padding takes no expert work (layers/moe.without_padding): a step's padding tokens, the
token bucket's tail and, under data parallel, an idle replica's whole batch (gathered with
the others' for the experts split across replicas), are routed to expert -1.

Proven by the group sizes the grouped products are handed (recorded as traced: a host
callback inside the compiled program, per device): they count the real tokens' (token,
expert) pairs only, one device or split over DP 2 x TP 2 (by expert, by width, by the
all-to-all dispatch); the real rows equal a float64 numpy MoE, padding rows come out zero,
and changing what the padding rows hold changes no real row."""

import types

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from tests.parallel.test_moe_expert_parallel import CFG, D, E, _dense_block
from xla_inference.layers import moe
from xla_inference.layers.moe import moe_mlp
from xla_inference.parallel.sharding import (build_mesh, param_shardings, place_params,
                                             replica_local_specs, traced_over)
from xla_inference.runner.requests import BatchLayout, RequestState, build_step_batch

T, REAL = 12, 7  # tokens per replica; the first REAL are real, the rest padding


@pytest.fixture
def group_sizes(monkeypatch):
    """Every grouped SwiGLU's group sizes, as each device ran them (numpy, in call order)."""
    seen = []
    grouped = moe._swiglu_grouped

    def recording(w, xs, sizes):
        jax.debug.callback(lambda s: seen.append(np.asarray(s)), sizes)
        return grouped(w, xs, sizes)

    monkeypatch.setattr(moe, "_swiglu_grouped", recording)
    jax.clear_caches()
    yield seen
    jax.clear_caches()


def _reference_f64(block, x) -> tuple[np.ndarray, np.ndarray]:
    """(the MoE of x [T, D] in float64 numpy, each token's k experts)."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    logits = f(x) @ f(block.router)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.argsort(-probs, axis=-1)[:, :CFG.num_experts_per_tok]
    weights = np.take_along_axis(probs, chosen, -1)
    weights /= weights.sum(-1, keepdims=True)  # norm_topk_prob
    out = np.zeros_like(f(x))
    for t in range(x.shape[0]):
        for e, w in zip(chosen[t], weights[t]):
            gate, up = f(x[t]) @ f(block.w_gate[e]), f(x[t]) @ f(block.w_up[e])
            out[t] += w * ((gate / (1 + np.exp(-gate)) * up) @ f(block.w_down[e]))
    return out, chosen


def _tokens(seed: int, replicas: int = 1) -> np.ndarray:
    """[replicas, T, D]: real rows from one generator, padding rows large, from `seed`."""
    real = np.random.default_rng(0).standard_normal((replicas, REAL, D))
    padding = 50 * np.random.default_rng(seed).standard_normal((replicas, T - REAL, D))
    return np.concatenate([real, padding], axis=1).astype(np.float32)


def _pairs_per_expert(chosen: np.ndarray) -> np.ndarray:
    return np.bincount(chosen.reshape(-1), minlength=E)


def test_padding_rows_take_no_group_rows_one_device(group_sizes):
    block, real_tokens = _dense_block(), np.arange(T) < REAL
    step = jax.jit(lambda p, x, real: moe_mlp(p, x, CFG, real))
    outs = []
    for seed in (1, 2):
        x = _tokens(seed)[0]
        outs.append(np.asarray(step(block, x, real_tokens)))
        jax.effects_barrier()
        want, chosen = _reference_f64(block, x[:REAL])
        np.testing.assert_allclose(outs[-1][:REAL], want, rtol=1e-5, atol=1e-5)
        assert not outs[-1][REAL:].any()
        assert group_sizes[-1].tolist() == _pairs_per_expert(chosen).tolist()
    np.testing.assert_array_equal(outs[0][:REAL], outs[1][:REAL])
    # Unmasked (no real_tokens: the torch path's call), every row takes its pairs' rows.
    jax.jit(lambda p, x: moe_mlp(p, x, CFG))(block, _tokens(1)[0]).block_until_ready()
    jax.effects_barrier()
    assert group_sizes[-1].sum() == T * CFG.num_experts_per_tok


def _replicas_step(block, split: str, mesh):
    """moe_mlp inside the data parallel replicas' shard_map as runner/engine nests it, the
    experts split over (data, model) by `split`; each replica its own real_tokens."""
    model_cfg = types.SimpleNamespace(moe=CFG, intermediate_size=block.w_gate.shape[2])
    shardings = param_shardings(block, model_cfg, mesh, split)
    placed = place_params(block, shardings)

    def replicas(p, x, real):
        return jax.shard_map(lambda p, x, real: moe_mlp(p, x[0], CFG, real[0])[None],
                             mesh=mesh, in_specs=(replica_local_specs(shardings),
                                                  PartitionSpec("data"), PartitionSpec("data")),
                             out_specs=PartitionSpec("data"), axis_names={"data"},
                             check_vma=False)(p, x, real)

    return jax.jit(traced_over(mesh, replicas)), placed


@pytest.mark.parametrize("split,dispatch", [("experts", "all-reduce"), ("mlp", "all-reduce"),
                                            ("experts", "all-to-all")])
def test_idle_replica_takes_no_expert_work(group_sizes, monkeypatch, split, dispatch):
    """DP 2 x TP 2, replica 0 with REAL tokens and padding, replica 1 idle (all padding):
    the devices' groups hold replica 0's real pairs only, once (experts split: each pair
    on the device holding its expert; width split: every device all of them)."""
    monkeypatch.setenv("XLA_INFERENCE_MOE_DISPATCH", dispatch)
    block, mesh = _dense_block(), build_mesh(2, data_parallel_size=2)
    step, placed = _replicas_step(block, split, mesh)
    real_tokens = np.stack([np.arange(T) < REAL, np.zeros(T, bool)])
    outs = []
    for seed in (1, 2):
        x = _tokens(seed, replicas=2)
        group_sizes.clear()
        outs.append(np.asarray(step(placed, x, real_tokens)))
        want, chosen = _reference_f64(block, x[0, :REAL])
        np.testing.assert_allclose(outs[-1][0, :REAL], want, rtol=1e-5, atol=1e-5)
        assert not outs[-1][0, REAL:].any() and not outs[-1][1].any()
        jax.effects_barrier()
        pairs = _pairs_per_expert(chosen)
        assert len(group_sizes) == 4  # one grouped SwiGLU per device
        if split == "experts":  # device d holds experts 2d, 2d + 1
            assert sorted(s.tolist() for s in group_sizes) == sorted(
                pairs.reshape(4, 2).tolist())
        else:
            assert all(s.tolist() == pairs.tolist() for s in group_sizes)
    np.testing.assert_array_equal(outs[0][0, :REAL], outs[1][0, :REAL])


def test_real_tokens_are_the_scheduled_ones():
    """build_step_batch's padding (the bucket's tail; an empty replica's whole batch) is
    what AttentionMetadata.real_tokens leaves out, with page ids counted from a replica's
    first page (its null page)."""
    layout = BatchLayout(num_tokens=16, num_seqs=4, max_blocks=4, block_size=4)
    reqs = [RequestState("a", list(range(5)), 5, [[33, 34]], 0),
            RequestState("b", list(range(3)), 3, [[40]], 0)]
    batch = build_step_batch([(reqs[0], 5), (reqs[1], 2)], layout, block_offset=32)
    assert np.asarray(batch.attention.real_tokens()).tolist() == [True] * 7 + [False] * 9
    idle = build_step_batch([], layout, block_offset=32)
    assert not np.asarray(idle.attention.real_tokens()).any()


@pytest.mark.slow  # two engines of a tiny Qwen3-MoE: ~30 s
def test_engine_step_routes_only_its_requests_tokens(group_sizes, tmp_path):
    """Through the engine: a tiny Qwen3-MoE (one MoE layer) at DP 2 x TP 2 with expert
    parallel, replica 1 idle, and on one device (the bucket's padding alone): each step's
    groups, summed over the devices, hold the scheduled tokens' pairs only, and the logits
    equal the one-device engine's."""
    import jax.numpy as jnp

    from tests.helpers import engine_request, save_tiny_family
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    model = load(save_tiny_family(tmp_path / "m", "qwen3_moe"), Precision.uniform(jnp.float32))
    ecfg = EngineConfig(num_blocks=64, block_size=4, max_num_tokens=32, max_num_seqs=8,
                        max_model_len=128)
    plan = [{0: 7, 1: 5}, {0: 1, 1: 4}]  # 12 then 5 tokens: buckets of 16 and 8 (or more)
    prompts = [list(range(3, 11)), [101, 7, 66, 9, 12, 40, 41, 42, 43]]
    logits = []
    for mesh in (None, build_mesh(2, data_parallel_size=2)):
        engine = build_engine(model, ecfg, mesh=mesh, expert_parallel=True,
                              keep_host_params=True)
        reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(prompts)]
        rows = []
        for step in plan:
            group_sizes.clear()
            scheduled = [(reqs[i], n) for i, n in step.items()]
            rows.append(np.asarray(engine.forward(scheduled).logits)[:len(scheduled)])
            jax.effects_barrier()
            for req, n in scheduled:
                req.num_computed_tokens += n
            pairs = sum(step.values()) * CFG.num_experts_per_tok
            assert sum(int(s.sum()) for s in group_sizes) == pairs, group_sizes
        logits.append(rows)
        assert mesh is None or engine.rows_per_replica.tolist() == [4, 0]  # replica 1 idle
    for one_device, replicas in zip(*logits):
        np.testing.assert_allclose(replicas, one_device, rtol=1e-4, atol=1e-4)
