"""Rotary position embeddings: the rotate-half layout most Hugging Face checkpoints use, and
the interleaved (adjacent pairs) layout of Llama 4."""

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


def yarn_inv_freq(head_dim: int, theta: float, s: dict, max_position_embeddings: int
                  ) -> tuple[np.ndarray, float]:
    """YaRN (as transformers computes it): inverse frequencies [H/2] and the factor that
    scales the rotated q and k (cos and sin).

    Long wavelengths are slowed by `factor`, the fastest-turning dimensions kept, with a
    linear ramp between the beta_fast and beta_slow cut-offs. The rotation's scale is 0.1 ln
    (factor) + 1, or with DeepSeek's mscale and mscale_all_dim, the ratio of two such
    terms (1 when they are equal, as in DeepSeek-V3's and Kimi-K2's configs).
    """
    old_len = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_position_embeddings / old_len
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(num_rotations):  # the dimension that turns this often in old_len
        return head_dim * math.log(old_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    return inv_freq.astype(np.float32), float(attention_factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x [T, N, H] rotated by angle positions[t] * inv_freq (first half pairs with second half)."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    return _rotate_half(x, angles)


def apply_mrope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                section: tuple[int, ...]) -> jax.Array:
    """Multimodal rope (Qwen2-VL's M-RoPE): x [T, N, H] rotated as apply_rope, but frequency
    j turns by the position on row k of positions [3, T] (time, height, width), where k is
    the chunk of `section` (sizes summing to H/2) that j falls in. Text tokens carry one
    position on all three rows, which is plain rope."""
    rows = np.repeat(np.arange(len(section)), section)  # [H/2], static
    angles = positions.astype(jnp.float32)[rows].T * inv_freq[None, :]  # [T, H/2]
    return _rotate_half(x, angles)


def _cos_sin(angles: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of angles [T, H/2], each [T, 1, H/2], computed once in the program.

    XLA's CPU fusion copies elementwise producers into each consumer, cos and sin included:
    left alone, every layer's q and k rotation recomputes both for each of its elements
    (heads x H: ~6 us a layer of a SmolLM2 decode step, over a third of the time in XLA's
    own fusions). A reduction is never copied into its consumers, so the table goes
    through one (the max of each value and -inf: the value itself, bit for bit); every
    layer's identical table is then one computation (XLA's CSE) that all rotations read."""
    table = jnp.stack([jnp.cos(angles), jnp.sin(angles)])  # [2, T, H/2]
    table = jnp.max(jnp.stack([table, jnp.full_like(table, -jnp.inf)], axis=-1), axis=-1)
    return table[0][:, None, :], table[1][:, None, :]


def _rotate_half(x: jax.Array, angles: jax.Array) -> jax.Array:
    cos, sin = _cos_sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply_rope_interleaved(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x [T, N, H] rotated with adjacent elements paired, (x[2i], x[2i+1]) as one complex
    number (Llama 4's checkpoints; Meta's original layout), in float32."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    cos, sin = _cos_sin(angles)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)  # [T, N, H/2, 2]
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([real * cos - imag * sin, imag * cos + real * sin], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
