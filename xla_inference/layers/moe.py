"""Mixture-of-experts feed-forward blocks (Mixtral, Qwen3-MoE): a softmax router picks
k experts per token, each a SwiGLU MLP; the token's output is their weighted sum.

`moe_mlp` computes only the chosen experts: the T * k (token, expert) pairs are sorted by
expert and run through grouped matmuls (`jax.lax.ragged_dot`), whose shapes are static
whatever the routing. `moe_mlp_dense` runs every expert on every token and masks the
result by the routing: the reference the grouped path is tested against.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    num_experts_per_tok: int  # k
    intermediate_size: int  # F of each expert
    norm_topk_prob: bool  # rescale the k chosen probabilities to sum to 1 (Mixtral always does)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MoeMlp:
    """One MoE block's weights, experts stacked on a leading axis (the `experts` sharding axis)."""

    router: jax.Array  # [D, E]
    w_gate: jax.Array  # [E, D, F]
    w_up: jax.Array  # [E, D, F]
    w_down: jax.Array  # [E, F, D]


def route(p: MoeMlp, x: jax.Array, cfg: MoeConfig) -> tuple[jax.Array, jax.Array]:
    """x [T, D] -> (weights [T, k] float32, experts [T, k] int32), best expert first.

    As transformers does: softmax over all experts in float32, then the top k, then (if
    configured) renormalisation over those k.
    """
    logits = jnp.einsum("TD,DE->TE", x, p.router)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def _swiglu_grouped(p: MoeMlp, xs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """xs [R, D], rows sorted by expert, group_sizes [E] -> [R, D]: row r through its expert."""
    gate = jax.lax.ragged_dot(xs, p.w_gate, group_sizes)  # [R, F]
    up = jax.lax.ragged_dot(xs, p.w_up, group_sizes)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, p.w_down, group_sizes)


def moe_mlp(p: MoeMlp, x: jax.Array, cfg: MoeConfig) -> jax.Array:
    """x [T, D] -> [T, D]: each token through its k experts, weighted by the routing."""
    T, D = x.shape
    k = cfg.num_experts_per_tok
    weights, experts = route(p, x, cfg)
    flat_experts = experts.reshape(T * k)  # pair r = t * k + j: token t's j-th choice
    order = jnp.argsort(flat_experts, stable=True)  # pairs grouped by expert
    group_sizes = jnp.bincount(flat_experts, length=cfg.num_experts).astype(jnp.int32)  # [E]
    out = _swiglu_grouped(p, x[order // k], group_sizes)  # [T*k, D] in sorted order
    unsorted = jnp.zeros_like(out).at[order].set(out).reshape(T, k, D)
    return (unsorted * weights[..., None].astype(out.dtype)).sum(axis=1)


def moe_mlp_dense(p: MoeMlp, x: jax.Array, cfg: MoeConfig) -> jax.Array:
    """The reference: every expert on every token, combined with the routing weights
    (zero for the experts a token did not choose)."""
    weights, experts = route(p, x, cfg)
    combine = (jax.nn.one_hot(experts, cfg.num_experts) * weights[..., None]).sum(axis=1)  # [T, E]
    gate = jnp.einsum("TD,EDF->TEF", x, p.w_gate)
    up = jnp.einsum("TD,EDF->TEF", x, p.w_up)
    out = jnp.einsum("TEF,EFD->TED", jax.nn.silu(gate) * up, p.w_down)
    return jnp.einsum("TED,TE->TD", out, combine.astype(out.dtype))
