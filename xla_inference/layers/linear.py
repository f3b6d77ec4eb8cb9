"""Linear projections ([in, out] weights, the layout params are stored in)."""

import jax


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ w [in, out], plus b [out] when the checkpoint has a bias."""
    y = x @ w
    return y if b is None else y + b
