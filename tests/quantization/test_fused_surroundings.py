"""A quantized decoder layer's RMS norms and residual adds made by the native kernel's calls
(cpu_quantized.Surroundings): the gate/up call normalizes its input itself, the down call
adds the residual, and nothing changes but XLA's small passes around them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import save_tiny_family
from tests.quantization.test_packed import random_group_quant
from tests.quantization.test_sharded import _logits
from xla_inference.kernels import cpu_quantized
from xla_inference.layers import linear
from xla_inference.layers.mlp import GatedMlp, gated_mlp
from xla_inference.layers.norms import DeferredRmsNorm, rms_norm
from xla_inference.quantization.groups import INT4
from xla_inference.quantization.packed import dequantize, pack


@pytest.fixture(autouse=True)
def _needs_kernel():
    assert cpu_quantized.available(), "the native CPU quantized kernel did not build"


def _mlp(seed=0):
    gate, up, down = (pack(random_group_quant(INT4, out, inp, 32, seed=seed + i))
                      for i, (out, inp) in enumerate([(96, 64), (96, 64), (64, 96)]))
    return GatedMlp(w_gate=gate, w_up=up, w_down=down)


def _unfused(monkeypatch):
    """The layers' products with the norms and residual adds left to XLA."""
    monkeypatch.setattr(linear, "fuses_rms_norm", lambda *args: False)
    monkeypatch.setattr(linear, "fuses_residual", lambda *args: False)


@pytest.mark.parametrize("rows", [1, 6])
def test_a_quantized_mlp_takes_its_norm_and_residual_in_its_calls(monkeypatch, rows):
    """residual + gated_mlp(rms_norm(x)) on 4-bit weights: two kernel calls and no XLA norm
    (no rsqrt left in the program), within the 15-bit activations' error of the float64
    MLP, and the unfused program's values to ~1e-5 (the norm's last bits differ: XLA's
    rsqrt is within an ulp, the kernel's correctly rounded)."""
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 64)) * 2, jnp.float32)
    residual = jnp.asarray(rng.standard_normal((rows, 64)), jnp.float32)
    norm_weight = jnp.asarray(rng.uniform(0.5, 1.5, 64), jnp.bfloat16)
    p = _mlp()

    def block(p, x, norm_weight, residual):
        return gated_mlp(p, DeferredRmsNorm(x, norm_weight, 1e-6), residual=residual)

    fused = jax.jit(block)
    text = fused.lower(p, x, norm_weight, residual).compile().as_text()
    assert text.count("custom_call_target=\"xla_inference_quantized_matmul_multi\"") == 2
    assert "rsqrt" not in text
    got = np.asarray(fused(p, x, norm_weight, residual))

    xn = np.asarray(x, np.float64)
    xn = xn / np.sqrt(np.mean(xn * xn, -1, keepdims=True) + 1e-6)
    xn = xn * np.asarray(norm_weight.astype(jnp.float32), np.float64)
    gate, up, down = (np.asarray(dequantize(w), np.float64) for w in (p.w_gate, p.w_up, p.w_down))
    g, u = xn @ gate.T, xn @ up.T
    want = np.asarray(residual, np.float64) + (g / (1 + np.exp(-g)) * u) @ down.T
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)

    _unfused(monkeypatch)
    plain = jax.jit(lambda *args: block(*args))  # a new function: jit caches by function
    assert "rsqrt" in plain.lower(p, x, norm_weight, residual).compile().as_text()
    np.testing.assert_allclose(got, np.asarray(plain(p, x, norm_weight, residual)),
                               rtol=1e-5, atol=1e-5)


def test_a_bfloat16_weight_leaves_the_norm_to_xla():
    """Unquantized weights: the deferred norm is XLA's rms_norm, to the bit."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.float32)
    weight = jnp.asarray(rng.uniform(0.5, 1.5, 64), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((32, 64)) * 0.1, jnp.bfloat16) for _ in range(2)]
    deferred = jax.jit(lambda x: linear.project_many(DeferredRmsNorm(x, weight, 1e-6), ws))(x)
    normed = jax.jit(lambda x: linear.project_many(rms_norm(x, weight, 1e-6), ws))(x)
    for a, b in zip(deferred, normed):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_online_int8_model_gives_the_unfused_logits(tmp_path, monkeypatch):
    """A 2-layer Qwen3 quantized to int8 at load, through the engine (a prefill, a chunked
    prefill, a decode-sized step): the logits of the program whose norms and residual adds XLA makes,
    to the 15-bit activations' rounding (a 1-ulp difference in a norm moves a value by at
    most one step, max|x| / 16383)."""
    model_dir = save_tiny_family(tmp_path / "qwen3", "qwen3")
    _, fused = _logits(model_dir, "int8")
    _unfused(monkeypatch)
    _, plain = _logits(model_dir, "int8")
    assert fused.keys() == plain.keys()
    for key, row in plain.items():
        np.testing.assert_allclose(fused[key], row, rtol=3e-4, atol=3e-4)
