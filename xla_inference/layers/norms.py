"""Normalization layers."""

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis; statistics in float32 whatever the input dtype."""
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    # Cast back before scaling, as HF Llama does, so bf16 results round the same way.
    return weight * (x32 * inv_rms).astype(x.dtype)
