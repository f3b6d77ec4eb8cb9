"""Gated feed-forward blocks."""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GatedMlp:
    # The checkpoint's [out, in] layout (layers/linear.py says why).
    w_gate: jax.Array  # [F, D]
    w_up: jax.Array  # [F, D]
    w_down: jax.Array  # [D, F]


def gated_mlp(p: GatedMlp, x: jax.Array, act: Callable = jax.nn.silu) -> jax.Array:
    """x [T, D] -> [T, D]: down(act(gate(x)) * up(x)); SwiGLU with the default silu."""
    gate = jnp.einsum("TD,FD->TF", x, p.w_gate)
    up = jnp.einsum("TD,FD->TF", x, p.w_up)
    return jnp.einsum("TF,DF->TD", act(gate) * up, p.w_down)
