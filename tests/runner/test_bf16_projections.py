"""dtype=bfloat16 on the host CPU: bfloat16 projection matrices, whose products round their
input to bfloat16 and accumulate in float32; float32 everywhere else.

The reference is transformers in float32 on a checkpoint whose matrices were rounded to
bfloat16, with every nn.Linear rounding its input to bfloat16: it must match whichever
bucket (the 1-token one, whose products take another form, or wider ones) computed a
position."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import (assert_ragged_logits, bf16_linear_inputs, hf_logits, save_bf16_rounded,
                           save_tiny_llama, tiny_engine)

# Two requests of 12 tokens: a prefill of both, then decode steps of one request alone (the
# 1-token bucket) and of both together, in turn.
PLAN = [{0: 6, 1: 8}, {0: 1}, {0: 1, 1: 1}, {1: 1}, {0: 1}, {0: 1, 1: 1}, {1: 1}]


@pytest.mark.parametrize("tie", [False, True])
def test_bf16_projections_match_transformers_with_rounded_linear_inputs(tmp_path, tie):
    model_dir = save_tiny_llama(tmp_path / "llama", tie=tie)
    rounded = save_bf16_rounded(model_dir, tmp_path / "rounded")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 128, size=12).tolist() for _ in range(2)]

    engine = tiny_engine(model_dir, narrow_dtype=jnp.bfloat16)
    params = engine.params
    for matrix in (params.layers[0].attn.wq, params.layers[1].attn.wo,
                   params.layers[0].mlp.w_up, params.lm_head):
        assert matrix.dtype == jnp.bfloat16
    for kept in (params.embed, params.layers[0].input_norm, params.final_norm):
        assert kept.dtype == jnp.float32  # gathered or elementwise, not multiplied
    assert engine.kv_cache.arrays[0][0].dtype == jnp.float32

    with bf16_linear_inputs():
        expected = [hf_logits(rounded, p) for p in prompts]
    assert_ragged_logits(engine, prompts, expected, PLAN, tol=1e-4)
    # Both roundings are real: leaving out either moves the logits by more than that.
    weights_only = hf_logits(rounded, prompts[0])
    assert np.abs(weights_only - expected[0]).max() > 1e-3
    original = hf_logits(model_dir, prompts[0])
    assert np.abs(original - weights_only).max() > 1e-3


def test_narrow_projections_leave_other_matrices():
    """MoE experts and routers are not multiplied by `project`: they keep their dtype."""
    from xla_inference.layers.mlp import GatedMlp
    from xla_inference.layers.moe import MoeMlp
    from xla_inference.loading.params import narrow_projections

    f32 = lambda *shape: np.ones(shape, np.float32)  # noqa: E731
    moe = MoeMlp(router=f32(4, 2), w_gate=f32(2, 4, 3), w_up=f32(2, 4, 3), w_down=f32(2, 3, 4),
                 shared_expert=GatedMlp(f32(3, 4), f32(3, 4), f32(4, 3)))
    out = narrow_projections([moe], jnp.bfloat16)[0]
    assert {out.router.dtype, out.w_gate.dtype, out.w_down.dtype} == {np.dtype(np.float32)}
    assert out.shared_expert.w_gate.dtype == jnp.bfloat16
    assert out.shared_expert.w_down.dtype == jnp.bfloat16


@pytest.mark.parametrize("rows", [1, 5])
def test_project_rounds_input_and_accumulates_in_float32(rows):
    from xla_inference.layers.linear import project

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((48, 64)), jnp.bfloat16)
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    got = project(jnp.asarray(x), w)
    assert got.dtype == jnp.float32
    x_rounded = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    want = x_rounded @ np.asarray(w.astype(jnp.float32), np.float64).T
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # and not the product of the unrounded input
    assert np.abs(np.asarray(got) - x @ np.asarray(w.astype(jnp.float32)).T).max() > 1e-3


@pytest.mark.parametrize("native_bf16_dot", [False, True])
@pytest.mark.parametrize("rows", [8, 128, 300])
def test_wide_bfloat16_products_widen_only_without_native_bfloat16_dots(monkeypatch, rows,
                                                                          native_bf16_dot):
    """From cpu_dense.WIDEN_MIN_ROWS rows on, a CPU without avx512_bf16 runs a bfloat16
    product in float32 on the widened operands (XLA's bfloat16 product is slower there):
    the dot in the compiled program is float32 then and bfloat16 otherwise, and either way
    the result is the float64 product of the bfloat16-rounded operands to float32
    rounding."""
    import jax

    from xla_inference.kernels import cpu_dense, native
    from xla_inference.layers.linear import project

    monkeypatch.setattr(native, "has_bfloat16_dot", lambda: native_bf16_dot)
    # XLA's product, not the AMX kernel that a CPU with AMX takes up to
    # linear.NATIVE_MATMUL_MAX_ROWS rows (its own tests: tests/kernels/test_dense_matmul.py).
    monkeypatch.setattr(cpu_dense, "matmul_available", lambda: False)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows, 96)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((40, 96)) * 0.1, jnp.bfloat16)
    product = jax.jit(lambda x, w: project(x, w))  # (a new trace under this CPU's flags)
    text = product.lower(x, w).as_text()
    widened = rows >= cpu_dense.WIDEN_MIN_ROWS and not native_bf16_dot
    dot_line = next(line for line in text.splitlines() if "dot_general" in line)
    assert ("tensor<96x40xf32>" in dot_line or "tensor<40x96xf32>" in dot_line) == widened, dot_line

    x_rounded = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    expected = x_rounded @ np.asarray(w.astype(jnp.float32), np.float64).T
    np.testing.assert_allclose(np.asarray(product(x, w)), expected, rtol=1e-5, atol=1e-5)
