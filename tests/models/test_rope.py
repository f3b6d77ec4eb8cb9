"""Rotary embeddings (layers/rope.py): the rotation against a float64 numpy reference, and
its cos/sin table computed once in a program however many layers rotate q and k."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xla_inference.layers.rope import apply_rope, apply_rope_interleaved, rope_inv_freq

HEAD_DIM = 64


def _reference(x, positions, inv_freq, interleaved):
    """x [T, N, H] rotated in float64 (the pairs: halves, or adjacent elements)."""
    angles = positions.astype(np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x = x.astype(np.float64)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
        return out
    a, b = np.split(x, 2, axis=-1)
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotation_matches_float64(interleaved):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, HEAD_DIM)).astype(np.float32)
    positions = np.array([0, 1, 17, 540, 4095], np.int32)
    inv_freq = rope_inv_freq(HEAD_DIM, 10000.0)
    rotate = apply_rope_interleaved if interleaved else apply_rope
    got = np.asarray(jax.jit(rotate)(jnp.asarray(x), jnp.asarray(positions), jnp.asarray(inv_freq)))
    # Angles are float32 products (as transformers computes them): off by up to ~position x
    # 6e-8 rad, so the error grows with the position (measured: 3e-5 at 540, 2e-4 at 4095).
    want = _reference(x, positions, inv_freq, interleaved)
    np.testing.assert_allclose(got[:3], want[:3], rtol=0, atol=5e-6)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


def test_cos_and_sin_computed_once_for_all_layers():
    """XLA's CPU fusion would copy cos and sin into every rotation's fusion (each layer's q
    and k, per element); the table is one computation however many layers read it."""
    inv_freq = jnp.asarray(rope_inv_freq(HEAD_DIM, 10000.0))

    @jax.jit
    def layer(q, k, positions):
        return jnp.tanh(apply_rope(q, positions, inv_freq)), jnp.tanh(apply_rope(k, positions, inv_freq))

    def step(q, k, positions):
        for _ in range(4):
            q, k = layer(q, k, positions)
        return q, k

    text = jax.jit(step).lower(jnp.ones((2, 9, HEAD_DIM)), jnp.ones((2, 3, HEAD_DIM)),
                               jnp.arange(2, dtype=jnp.int32)).compile().as_text()
    assert len(re.findall(r"\bcosine\(", text)) == 1
    assert len(re.findall(r"\bsine\(", text)) == 1
