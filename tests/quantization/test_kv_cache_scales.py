"""A checkpoint's FP8 KV cache scales (compressed-tensors' kv_cache_scheme, as llm-compressor
writes them): read per layer at load, used by the fp8 cache, refused where malformed.

The reference is transformers on the same float weights with eager attention whose keys
(after the rotary embedding) and values are rounded as the fp8 cache stores them, with the
checkpoint's scales (tests/quantization/checkpoints.fp8_kv_cache_attention). The same
reference with scales of 1.0 is the negative control: it must be far from our logits, so a
loader that dropped the scales would fail. The scales are not powers of two, so that
dividing by them changes how values round."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import ENGINE_BLOCK, assert_ragged_logits, rewrite_checkpoint
from tests.quantization.checkpoints import (K_SCALES, NUM_LAYERS, V_SCALES,
                                            fp8_kv_cache_attention, save_base_and_kv_scaled)

PLAN = [{0: 11, 1: 9, 2: 13}, {1: 14, 2: 1}]  # prefill, chunked prefill, decode
TOL = 2e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(the float base model, the same weights with FP8 KV cache scales declared)."""
    return save_base_and_kv_scaled(tmp_path_factory.mktemp("kv_cache_scales"))


def _prompts():
    rng = np.random.default_rng(4)
    return [rng.integers(0, 128, size=n).tolist() for n in (11, 23, 14)]


def _reference(base, prompts, k_scales, v_scales):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        base, torch_dtype=torch.float32,
        attn_implementation=fp8_kv_cache_attention(k_scales, v_scales)).eval()
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].numpy() for p in prompts]


def _engine(model_dir, kv_cache_dtype="fp8"):
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    model = load(model_dir, Precision.uniform(jnp.float32).with_kv_cache(kv_cache_dtype))
    return model, build_engine(model, EngineConfig(
        num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=64, max_num_seqs=8,
        max_model_len=128), keep_host_params=True)


def test_scales_are_read_per_layer(checkpoints):
    model, _ = _engine(checkpoints[1])
    for i, layer in enumerate(model.params.layers):
        assert float(layer.attn.k_scale) == np.float32(K_SCALES[i])
        assert float(layer.attn.v_scale) == np.float32(V_SCALES[i])


def test_fp8_cache_with_checkpoint_scales_matches_transformers(checkpoints):
    """Ragged batch (prefill, chunked prefill, decode) with an fp8 cache: the logits of
    transformers whose K/V round through fp8 with the checkpoint's scales, within float32
    noise; the reference rounding with scale 1.0 is at fp8's own error, far outside it."""
    base, scaled = checkpoints
    prompts = _prompts()
    want = _reference(base, prompts, K_SCALES, V_SCALES)
    _, engine = _engine(scaled)
    assert_ragged_logits(engine, prompts, want, PLAN, TOL)
    unscaled = _reference(base, prompts, (1.0,) * NUM_LAYERS, (1.0,) * NUM_LAYERS)
    assert max(np.abs(u - w).max() for u, w in zip(unscaled, want)) > 50 * TOL


def test_float_cache_ignores_the_checkpoint_scales(checkpoints):
    """kv_cache_dtype float32 (an explicit choice over the checkpoint's scheme): transformers'
    plain logits."""
    from tests.helpers import hf_logits

    base, scaled = checkpoints
    prompts = _prompts()
    _, engine = _engine(scaled, kv_cache_dtype="auto")
    assert_ragged_logits(engine, prompts, [hf_logits(base, p) for p in prompts], PLAN, TOL)


@pytest.mark.parametrize("change,message", [
    (lambda n, t: None if n.endswith("layers.1.self_attn.v_scale") else t,
     "no tensor 'model.layers.1.self_attn.v_scale'"),
    (lambda n, t: t.repeat(2) if n.endswith("layers.0.self_attn.k_scale") else t,
     "per-head scales are not"),
    (lambda n, t: -t if n.endswith("layers.0.self_attn.v_scale") else t,
     "must be positive and finite"),
], ids=["missing", "per-head shape", "negative"])
def test_malformed_scales_fail_at_load_naming_the_tensor(checkpoints, tmp_path, change, message):
    from xla_inference.models.loader import load_model

    bad = rewrite_checkpoint(checkpoints[1], tmp_path / "bad", change)
    with pytest.raises(ValueError, match=message):
        load_model(bad, jnp.float32)
