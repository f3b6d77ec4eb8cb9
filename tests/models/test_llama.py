"""The native JAX Llama against transformers' LlamaForCausalLM on tiny random checkpoints."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import (ENGINE_BLOCK, engine_request, hf_logits, run_chunks,
                           save_tiny_llama, tiny_engine)
from xla_inference.loading.params import WeightMismatchError
from xla_inference.models.loader import load_model
from xla_inference.runner.engine import EngineConfig, ModelEngine


@pytest.mark.parametrize("variant", [
    dict(),
    dict(tie=True),
    dict(num_kv_heads=4),
    dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_position_embeddings=16)),
    dict(sharded=True),
])
def test_logits_match_transformers_ragged(tmp_path, variant):
    model_dir = save_tiny_llama(tmp_path / "m", **variant)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, size=n).tolist() for n in (11, 23, 5)]
    expected = [hf_logits(model_dir, p) for p in prompts]
    engine = tiny_engine(model_dir)
    reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(prompts)]
    # Step 1: full prefill of r0, first chunk of r1, r2's prompt minus its last token.
    # Step 2: r0 nothing, r1 the rest (chunked prefill), r2 one token (decode-like).
    rows = run_chunks(engine, reqs, [{0: 11, 1: 9, 2: 4}, {1: 14, 2: 1}])
    for i, req in enumerate(reqs):
        for (rid, pos), got in rows.items():
            if rid == req.req_id:
                np.testing.assert_allclose(got, expected[i][pos], rtol=2e-4, atol=2e-4)


def test_decode_steps_match_transformers(tmp_path):
    """Token-by-token decode after a prefill, with the cache reused every step."""
    model_dir = save_tiny_llama(tmp_path / "m")
    tokens = np.random.default_rng(1).integers(0, 128, size=20).tolist()
    expected = hf_logits(model_dir, tokens)
    engine = tiny_engine(model_dir)
    req = engine_request("r", tokens, 3)
    rows = run_chunks(engine, [req], [{0: 8}] + [{0: 1}] * 12)
    for (_, pos), got in rows.items():
        np.testing.assert_allclose(got, expected[pos], rtol=2e-4, atol=2e-4)


def test_bfloat16_close_to_float32(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "m")
    tokens = list(range(3, 19))
    expected = hf_logits(model_dir, tokens)
    module, cfg, params = load_model(model_dir, jnp.bfloat16)
    engine = ModelEngine(module, cfg, params, EngineConfig(16, ENGINE_BLOCK, 32, 4, 64), jnp.bfloat16)
    logits = np.asarray(engine.forward([(engine_request("r", tokens, 1), 16)]).logits)
    np.testing.assert_allclose(logits[0], expected[-1], atol=0.1)


def test_mismatched_weights_name_the_tensor(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "m")
    cfg_path = model_dir / "config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"intermediate_size": 96', '"intermediate_size": 80'))
    with pytest.raises(WeightMismatchError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight"):
        load_model(model_dir, jnp.float32)


def test_unsupported_architecture_is_named(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "m")
    cfg_path = model_dir / "config.json"
    cfg_path.write_text(cfg_path.read_text().replace("LlamaForCausalLM", "FooForCausalLM"))
    with pytest.raises(ValueError, match=r"supported: .*\bLlamaForCausalLM\b"):
        load_model(model_dir, jnp.float32)


@pytest.mark.slow
def test_gguf_file_loads_like_the_prepared_directory():
    """Serving the .gguf directly gives the same parameters as the converted HF directory
    (its weights kept quantized: their dequantized values)."""
    import jax

    from xla_inference.loading.params import dense

    from xla_inference.loading.default_model import default_gguf_path, prepare_default_model

    _, cfg_dir, params_dir = load_model(prepare_default_model(), jnp.float32)
    _, cfg_gguf, params_gguf = load_model(default_gguf_path(), jnp.float32)
    assert cfg_gguf == cfg_dir
    for a, b in zip(jax.tree.leaves(params_dir), jax.tree.leaves(params_gguf)):
        np.testing.assert_array_equal(np.asarray(a), dense(b, np.float32))
