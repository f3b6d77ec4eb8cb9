"""Normalization layers."""

import dataclasses

import jax
import jax.numpy as jnp


def _normalized_f32(x: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis; statistics in float32 whatever the input dtype."""
    # Cast back before scaling, as HF Llama does, so bf16 results round the same way.
    return weight * _normalized_f32(x, eps).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class DeferredRmsNorm:
    """rms_norm(x, weight, eps), left to the projections it feeds: where they run as one
    native quantized kernel call, the kernel normalizes x itself (layers/linear.project_many),
    in place of XLA's four small passes; everything else takes .value()."""

    x: jax.Array
    weight: jax.Array
    eps: float

    @property
    def shape(self) -> tuple[int, ...]:
        return self.x.shape

    def value(self) -> jax.Array:
        return rms_norm(self.x, self.weight, self.eps)


def materialized(x) -> jax.Array:
    """x itself, or a DeferredRmsNorm's value."""
    return x.value() if isinstance(x, DeferredRmsNorm) else x


def gemma_rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: scales by (1 + weight), so a zero weight is the identity.

    Unlike rms_norm, the scaling happens in float32 and the result is cast once, as HF
    Gemma does, so bfloat16 runs round the same way.
    """
    scale = 1.0 + weight.astype(jnp.float32)
    return (_normalized_f32(x, eps) * scale).astype(x.dtype)


def l2_norm(x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm without a weight (Llama 4's "L2 norm" of q and k per head), in float32."""
    return _normalized_f32(x, eps).astype(x.dtype)
