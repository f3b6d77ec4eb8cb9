"""The runner's build API: the precision policy, random weights of a checkpoint's shapes,
the KV page size from the model's per-layer description."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import save_tiny_family, save_tiny_llama
from xla_inference.runner.build import Precision, build_engine, load
from xla_inference.runner.engine import EngineConfig

F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)


F16 = jnp.dtype(jnp.float16)


@pytest.mark.parametrize("dtype, platform, want", [
    # bfloat16 products, float32 elsewhere, the KV cache bfloat16 (the native kernel reads it)
    ("bfloat16", "cpu", (BF16, F32, BF16)),
    ("float16", "cpu", (F16, F32, BF16)),  # the CPU's 16-bit cache is bfloat16
    ("float32", "cpu", (F32, F32, F32)),
    ("bfloat16", "gpu", (BF16, BF16, BF16)),  # accelerators run the dtype throughout
    ("bfloat16", "tpu", (BF16, BF16, BF16)),
])
def test_precision_for_platform(dtype, platform, want):
    from xla_inference.kernels import cpu_attention

    assert cpu_attention.available(), "the native CPU attention kernel did not build"
    p = Precision.for_platform(dtype, platform)
    assert (p.weights, p.activations, p.kv_cache) == want
    assert p.narrows_projections == (want[0] != want[1])


def test_cpu_cache_is_float32_without_the_native_kernel(monkeypatch):
    """The plain-jnp kernel would widen a 16-bit cache's pages as it gathers them: there a
    16-bit model keeps its cache in float32."""
    from xla_inference.kernels import cpu_attention

    monkeypatch.setattr(cpu_attention, "available", lambda: False)
    assert Precision.for_platform("bfloat16", "cpu").kv_cache == F32
    monkeypatch.undo()
    monkeypatch.setenv("XLA_INFERENCE_KERNELS", "jnp")
    assert Precision.for_platform("bfloat16", "cpu").kv_cache == F32


def test_named_16_bit_kv_cache_dtypes():
    """--kv-cache-dtype bfloat16 / float16: served where 'auto' stores that dtype anyway,
    bfloat16 on the CPU for any model dtype, refused by name elsewhere."""
    f32, bf16 = Precision.uniform(F32), Precision.uniform(BF16)
    assert f32.with_kv_cache("bfloat16", "cpu").kv_cache == BF16
    assert f32.with_kv_cache("bfloat16", "cpu").activations == F32
    assert bf16.with_kv_cache("bfloat16", "tpu") == bf16
    assert Precision.uniform(F16).with_kv_cache("float16", "gpu").kv_cache == F16
    cpu_f16_model = Precision(F16, F32, BF16)
    for refused, precision, platform in [("float16", cpu_f16_model, "cpu"),
                                         ("float16", f32, "cpu"), ("bfloat16", f32, "gpu")]:
        with pytest.raises(ValueError, match=f"kv_cache_dtype '{refused}' is not served"):
            precision.with_kv_cache(refused, platform)


def _shapes(tree):
    return [(a.shape, a.dtype) for a in jax.tree.leaves(tree)]


def test_random_weights_need_only_the_config(tmp_path):
    real_dir = save_tiny_llama(tmp_path / "llama")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(real_dir / "config.json", config_only / "config.json")
    precision = Precision(BF16, F32, F32)
    real = load(real_dir, precision)
    drawn = load(config_only, precision, random_seed=0)
    assert _shapes(drawn.params) == _shapes(real.params)
    leaves = [np.asarray(a, np.float32) for a in jax.tree.leaves(drawn.params)]
    assert all(np.abs(a).max() <= 1e-3 for a in leaves)
    assert all(np.abs(a).max() > 0 for a in leaves if a.size > 4)  # drawn, not zeros
    # The projections follow the policy: the LM head and q/k/v/o, MLP in bfloat16.
    assert drawn.params.lm_head.dtype == BF16 and drawn.params.embed.dtype == F32


def test_random_weights_serve_a_step(tmp_path):
    model = load(save_tiny_llama(tmp_path / "llama"), Precision.uniform(F32), random_seed=3)
    engine = build_engine(model, EngineConfig(num_blocks=16, block_size=4, max_num_tokens=16,
                                              max_num_seqs=2, max_model_len=32))
    assert model.params is None  # the engine holds the only (placed) copy
    from tests.helpers import engine_request

    logits = np.asarray(engine.forward([(engine_request("r", [1, 2, 3], 1), 3)]).logits)
    assert np.isfinite(logits).all()


def test_kv_page_bytes_follow_the_layer_kinds(tmp_path):
    llama = load(save_tiny_llama(tmp_path / "llama"), Precision.uniform(F32))
    cfg = llama.cfg
    assert llama.kv_page_bytes(16) == cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    mistral = load(save_tiny_family(tmp_path / "mistral", "mistral", sliding_window=8),
                   Precision.uniform(F32))
    assert {layer.kind for layer in mistral.kv_layers()} == {"sliding_window"}
    assert all(layer.sliding_window == 8 for layer in mistral.kv_layers())
