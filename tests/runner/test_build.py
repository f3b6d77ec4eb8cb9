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


@pytest.mark.parametrize("dtype, platform, want", [
    ("bfloat16", "cpu", (BF16, F32, F32)),  # bfloat16 products, float32 elsewhere
    ("float32", "cpu", (F32, F32, F32)),
    ("bfloat16", "gpu", (BF16, BF16, BF16)),  # accelerators run the dtype throughout
    ("bfloat16", "tpu", (BF16, BF16, BF16)),
])
def test_precision_for_platform(dtype, platform, want):
    p = Precision.for_platform(dtype, platform)
    assert (p.weights, p.activations, p.kv_cache) == want
    assert p.narrows_projections == (want[0] != want[1])


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
