"""Gated feed-forward blocks."""

import dataclasses
from collections.abc import Callable

import jax

from xla_inference.layers.linear import project_many, row_parallel_project
from xla_inference.parallel.axes import weight


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GatedMlp:
    # The checkpoint's [out, in] layout (layers/linear.py says why).
    w_gate: jax.Array = weight("mlp", "embed", projection=True)  # [F, D]
    w_up: jax.Array = weight("mlp", "embed", projection=True)  # [F, D]
    w_down: jax.Array = weight("embed", "mlp", projection=True)  # [D, F]


def gated_mlp(p: GatedMlp, x: jax.Array, act: Callable = jax.nn.silu,
              residual: jax.Array | None = None) -> jax.Array:
    """x [T, D] (or a norms.DeferredRmsNorm the gate and up projections take) -> [T, D]:
    down(act(gate(x)) * up(x)); SwiGLU with the default silu. Under tensor parallel the down
    projection is a collective matmul (layers/linear.py). With residual [T, D], residual
    plus that (made by the down projection's call where it can)."""
    gate, up = project_many(x, (p.w_gate, p.w_up))
    hidden = act(gate) * up  # [T, F], split on F under TP
    return row_parallel_project(hidden, p.w_down, logical_axis="mlp", units=hidden.shape[-1],
                                residual=residual)
