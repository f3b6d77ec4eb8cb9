"""Linear projections. Weights stay in the checkpoint's [out, in] layout: loading needs no
transpose, and XLA's CPU backend runs the small decode buckets faster with it (SmolLM2
engine step, the two layouts interleaved in one process: 4 rows 116 against 126 ms, 16
rows 221 against 254; 1 row equal, 64 rows 4% slower).

Weights may be stored narrower than the activations: on the host CPU, dtype=bfloat16 runs
the 1-token step on bfloat16 copies of the weight matrices (runner/engine.py says why)."""

import jax
import jax.numpy as jnp


def project(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """x [..., in] times w [out, in] -> [..., out] in `out_dtype` (default x's dtype).

    A weight narrower than x (bfloat16 against float32 activations) is widened where it is
    read: written as x times the widened w's transpose, XLA's CPU backend fuses the widening
    into the product for a single row (a matrix-vector loop over both cores that reads the
    bfloat16 bytes: the LM head 2.05 -> 0.91 ms). The arithmetic stays float32.
    """
    out_dtype = out_dtype or x.dtype
    if w.dtype != x.dtype:
        return jnp.einsum("...i,io->...o", x, w.T.astype(x.dtype), preferred_element_type=out_dtype)
    return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=out_dtype)


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x [..., in] times w [out, in] -> [..., out], plus b [out] when the checkpoint has one."""
    y = project(x, w)
    return y if b is None else y + b
