"""Linear projections. Weights stay in the checkpoint's [out, in] layout: loading needs no
transpose, and XLA's CPU backend runs the small decode buckets faster with it (SmolLM2
engine step, the two layouts interleaved in one process: 4 rows 116 against 126 ms, 16
rows 221 against 254; 1 row equal, 64 rows 4% slower)."""

import jax
import jax.numpy as jnp


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x [..., in] times w [out, in] -> [..., out], plus b [out] when the checkpoint has one."""
    y = jnp.einsum("...i,oi->...o", x, w)
    return y if b is None else y + b
