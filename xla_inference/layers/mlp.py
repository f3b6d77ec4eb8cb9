"""Gated feed-forward blocks."""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GatedMlp:
    w_gate: jax.Array  # [D, F]
    w_up: jax.Array  # [D, F]
    w_down: jax.Array  # [F, D]


def gated_mlp(p: GatedMlp, x: jax.Array, act: Callable = jax.nn.silu) -> jax.Array:
    """x [T, D] -> [T, D]: down(act(gate(x)) * up(x)); SwiGLU with the default silu."""
    gate = jnp.einsum("TD,DF->TF", x, p.w_gate)
    up = jnp.einsum("TD,DF->TF", x, p.w_up)
    return jnp.einsum("TF,FD->TD", act(gate) * up, p.w_down)
