"""Gated feed-forward blocks."""

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax

from xla_inference.layers.linear import project


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GatedMlp:
    PROJECTIONS: ClassVar = ("w_gate", "w_up", "w_down")  # multiplied by linear.project
    # The checkpoint's [out, in] layout (layers/linear.py says why).
    w_gate: jax.Array  # [F, D]
    w_up: jax.Array  # [F, D]
    w_down: jax.Array  # [D, F]


def gated_mlp(p: GatedMlp, x: jax.Array, act: Callable = jax.nn.silu) -> jax.Array:
    """x [T, D] -> [T, D]: down(act(gate(x)) * up(x)); SwiGLU with the default silu."""
    return project(act(project(x, p.w_gate)) * project(x, p.w_up), p.w_down)
