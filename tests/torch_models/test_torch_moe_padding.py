"""The torch path's MoE (torch_models/moe.FusedMoeForward, what replaces each vLLM
MoERunner's forward) routes a step's padding tokens to no expert, as the native families
do (layers/moe.without_padding through routed_mlp; the step's real tokens read from the
step being traced, torch_models/step.step_real_tokens).

The forward of a runner holding the experts of tests/parallel/test_moe_padding.py's block
(w13 / w2 laid out as vLLM's routed experts hold them, relaid out by the loader's
relayout_experts), traced under jax.jit in torchax's environment inside a step whose last
rows are padding: the group sizes recorded inside the compiled program count the real
tokens' (token, expert) pairs only, the real rows equal the float64 MoE, padding rows are
zero and what they hold changes no real row; outside a step every row counts (the
difference the mask makes). Through vLLM's own classes and the engine:
tests/torch_models/test_torch_moe.py (the group sizes of its Qwen3-MoE steps)."""

import types

import jax
import numpy as np
import torch

from tests.parallel.test_moe_expert_parallel import CFG, _dense_block
from tests.parallel.test_moe_padding import (REAL, T, _pairs_per_expert, _reference_f64,
                                             _tokens, group_sizes)  # noqa: F401 (fixture)
from xla_inference.runner.requests import BatchLayout, RequestState, build_step_batch
from xla_inference.torch_models import moe
from xla_inference.torch_models.step import from_torch, step_context, to_torch, torchax


class FusedTopKRouter:  # named as vLLM's softmax top-k router (moe.routing reads the name)
    scoring_func = "softmax"
    e_score_correction_bias = None

    def __init__(self, renormalize: bool):
        self.renormalize = renormalize


def _runner(block):
    """A stand-in for one vLLM MoERunner over `block`'s experts: the fields
    FusedMoeForward reads, the experts as vLLM loads them (w13 [E, 2F, D], w2 [E, D, F])."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    experts = torch.nn.Module()
    experts.w13_weight = torch.nn.Parameter(t(np.concatenate(
        [block.w_gate.transpose(0, 2, 1), block.w_up.transpose(0, 2, 1)], axis=1)),
        requires_grad=False)
    experts.w2_weight = torch.nn.Parameter(t(block.w_down.transpose(0, 2, 1)),
                                           requires_grad=False)
    config = types.SimpleNamespace(num_experts=CFG.num_experts,
                                   experts_per_token=CFG.num_experts_per_tok,
                                   intermediate_size_per_partition=CFG.intermediate_size)
    return types.SimpleNamespace(moe_config=config, gate=None, routed_experts=experts,
                                 shared_experts=None, routed_scaling_factor=1.0,
                                 router=FusedTopKRouter(CFG.norm_topk_prob))


def _step_metadata():
    """A step of REAL scheduled tokens in a bucket of T: the rest is padding."""
    layout = BatchLayout(num_tokens=T, num_seqs=4, max_blocks=4, block_size=4)
    reqs = [RequestState("a", list(range(5)), 5, [[3, 4]], 0),
            RequestState("b", list(range(3)), 3, [[7]], 0)]
    batch = build_step_batch([(reqs[0], 5), (reqs[1], REAL - 5)], layout)
    assert np.asarray(batch.attention.real_tokens()).tolist() == [True] * REAL + [False] * (T - REAL)
    return batch.attention


def test_torch_path_padding_takes_no_group_rows(group_sizes):  # noqa: F811
    block = _dense_block()
    forward = moe.FusedMoeForward(_runner(block))
    moe.relayout_experts(forward)
    experts = forward.experts
    weights = [np.asarray(getattr(experts, n).detach().numpy())
               for n in ("w_gate", "w_up", "w_down")]  # as the loader hands them to JAX
    metadata = _step_metadata()

    def step(w, x, router, metadata, in_step):
        for name, value in zip(("w_gate", "w_up", "w_down"), w):  # the step's values
            setattr(experts, name, torch.nn.Parameter(to_torch(value), requires_grad=False))
        logits = x @ router
        with torchax.default_env():
            if not in_step:
                return from_torch(forward(to_torch(x), to_torch(logits)))
            with step_context(None, metadata):
                return from_torch(forward(to_torch(x), to_torch(logits)))

    traced = jax.jit(step, static_argnums=4)
    outs = []
    for seed in (1, 2):
        x = _tokens(seed)[0]
        group_sizes.clear()
        outs.append(np.asarray(traced(weights, x, block.router, metadata, True)))
        jax.effects_barrier()
        want, chosen = _reference_f64(block, x[:REAL])
        np.testing.assert_allclose(outs[-1][:REAL], want, rtol=1e-5, atol=1e-5)
        assert not outs[-1][REAL:].any()
        assert [s.tolist() for s in group_sizes] == [_pairs_per_expert(chosen).tolist()]
    np.testing.assert_array_equal(outs[0][:REAL], outs[1][:REAL])
    # Outside a step (no real tokens known): every row takes its pairs' rows.
    group_sizes.clear()
    traced(weights, _tokens(1)[0], block.router, metadata, False).block_until_ready()
    jax.effects_barrier()
    assert group_sizes[-1].sum() == T * CFG.num_experts_per_tok
