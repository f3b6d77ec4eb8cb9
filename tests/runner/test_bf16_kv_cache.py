"""dtype=bfloat16 on the host CPU with the native attention kernel: the KV cache is
bfloat16 (runner/build.py cpu_kv_cache_dtype), half a float32 cache's bytes per page.

The reference is transformers in float32 on the checkpoint with its matrices rounded to
bfloat16, every nn.Linear's input rounded to bfloat16 (tests/runner/test_bf16_projections.py)
and, here, the keys (after RoPE) and values rounded to bfloat16 where attention reads them,
as the cache stores them. With all three roundings the engine must match it as closely as
the float32-cache engine matches its reference (1e-4: float32 summation order alone);
leaving out the K/V rounding moves the logits by more than that, so the test sees the
cache's precision."""

import dataclasses

import jax.numpy as jnp
import numpy as np

from tests.helpers import (ENGINE_BLOCK, assert_ragged_logits, bf16_keys_and_values,
                           bf16_linear_inputs, hf_logits, save_bf16_rounded, save_tiny_llama)
from xla_inference.kernels import cpu_attention
from xla_inference.runner.build import Precision, build_engine, load
from xla_inference.runner.engine import EngineConfig

PLAN = [{0: 6, 1: 8}, {0: 1}, {0: 1, 1: 1}, {1: 1}, {0: 1}, {0: 1, 1: 1}, {1: 1}]


def test_bfloat16_cache_matches_transformers_with_rounded_keys_and_values(tmp_path):
    assert cpu_attention.available(), "the native CPU attention kernel did not build"
    model_dir = save_tiny_llama(tmp_path / "llama")
    rounded = save_bf16_rounded(model_dir, tmp_path / "rounded")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 128, size=12).tolist() for _ in range(2)]

    precision = Precision.for_platform("bfloat16", "cpu")
    assert precision.kv_cache == jnp.bfloat16 and precision.activations == jnp.float32
    model = load(model_dir, precision)
    float32_cache = dataclasses.replace(precision, kv_cache=jnp.dtype(jnp.float32))
    f32_page = dataclasses.replace(model, precision=float32_cache).kv_page_bytes(ENGINE_BLOCK)
    assert 2 * model.kv_page_bytes(ENGINE_BLOCK) == f32_page  # twice the tokens per byte
    engine = build_engine(model, EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK,
                                              max_num_tokens=64, max_num_seqs=8,
                                              max_model_len=128))
    assert {a.dtype for arrays in engine.kv_cache.arrays for a in arrays} == {jnp.dtype(jnp.bfloat16)}

    with bf16_linear_inputs(), bf16_keys_and_values():
        expected = [hf_logits(rounded, p) for p in prompts]
    assert_ragged_logits(engine, prompts, expected, PLAN, tol=1e-4)
    with bf16_linear_inputs():
        float32_kv = hf_logits(rounded, prompts[0])
    assert np.abs(float32_kv - expected[0]).max() > 1e-3
