"""Rotary position embeddings (the rotate-half layout Hugging Face checkpoints use)."""

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies [H/2], with the rope scaling a checkpoint asks for."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv_freq.astype(np.float32)
    if kind == "llama3":
        return _llama3_scaled(inv_freq, scaling).astype(np.float32)
    if kind == "linear":
        return (inv_freq / scaling["factor"]).astype(np.float32)
    raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")


def _llama3_scaled(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band
    # between the two cut-offs is interpolated smoothly.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(is_mid, interpolated, out)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x [T, N, H] rotated by angle positions[t] * inv_freq (first half pairs with second half)."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
