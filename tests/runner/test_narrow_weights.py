"""dtype=bfloat16 on the host CPU: bfloat16 weight matrices, float32 arithmetic.

The engine's narrow_dtype runs the 1-token step on bfloat16 copies of the weight matrices
and wider steps on float32 arrays of the same values; both must equal transformers in
float32 on a checkpoint whose matrices were rounded to bfloat16 (an independent reference),
whichever bucket computed a position."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import (assert_ragged_logits, hf_logits, save_bf16_rounded, save_tiny_llama,
                           tiny_engine)

# Two requests of 12 tokens: a prefill of both, then decode steps of one request alone (the
# 1-token bucket, bfloat16 weights) and of both together (float32 copies), in turn.
PLAN = [{0: 6, 1: 8}, {0: 1}, {0: 1, 1: 1}, {1: 1}, {0: 1}, {0: 1, 1: 1}, {1: 1}]


@pytest.mark.parametrize("tie", [False, True])
def test_bf16_weights_match_transformers_on_rounded_weights(tmp_path, tie):
    model_dir = save_tiny_llama(tmp_path / "llama", tie=tie)
    rounded = save_bf16_rounded(model_dir, tmp_path / "rounded")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 128, size=12).tolist() for _ in range(2)]

    engine = tiny_engine(model_dir, narrow_dtype=jnp.bfloat16)
    one_token = engine.params_for(1)
    assert one_token.layers[0].attn.wq.dtype == jnp.bfloat16
    assert one_token.layers[0].mlp.w_up.dtype == jnp.bfloat16
    assert one_token.lm_head.dtype == jnp.bfloat16
    assert one_token.embed.dtype == jnp.float32  # gathered, not multiplied
    assert engine.params_for(2).layers[0].mlp.w_up.dtype == jnp.float32

    expected = [hf_logits(rounded, p) for p in prompts]
    assert_ragged_logits(engine, prompts, expected, PLAN, tol=2e-5)
    # The rounding is real: the unrounded checkpoint's logits are further away than that.
    original = hf_logits(model_dir, prompts[0])
    assert np.abs(original - expected[0]).max() > 1e-3


def test_project_widens_a_narrow_weight_in_float32():
    from xla_inference.layers.linear import project

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((48, 64)), jnp.bfloat16)
    want_w = np.asarray(w.astype(jnp.float32), np.float64)
    for rows in (1, 5):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        got = project(jnp.asarray(x), w)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), x.astype(np.float64) @ want_w.T,
                                   rtol=1e-5, atol=1e-5)
