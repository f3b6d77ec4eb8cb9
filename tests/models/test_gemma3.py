"""The native JAX Gemma 3 against transformers' Gemma3ForCausalLM on tiny random checkpoints.

The tiny model has a sliding layer, a global layer and another sliding layer, a window of
8 tokens (shorter than every test sequence), random (1 + w) norm weights and soft-capped
final logits. Logits agree with transformers within 2e-4 (float32).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import (ENGINE_BLOCK, engine_request, hf_logits, read_json, run_chunks,
                           save_tiny_gemma3, tiny_engine)
from xla_inference.models import gemma3
from xla_inference.models.loader import load_model
from xla_inference.runner.engine import EngineConfig, ModelEngine

TOL = dict(rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("variant", [dict(), dict(tie=False, final_soft_cap=None)],
                         ids=["tied-softcap", "untied-nocap"])
def test_logits_match_transformers_ragged(tmp_path, variant):
    model_dir = save_tiny_gemma3(tmp_path / "m", **variant)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, size=n).tolist() for n in (11, 23, 5)]
    expected = {f"r{i}": hf_logits(model_dir, p) for i, p in enumerate(prompts)}
    if variant.get("final_soft_cap", 1.5):
        # The cap must bite for the test to cover it.
        assert max(np.abs(e).max() for e in expected.values()) > 0.5 * 1.5
    engine = tiny_engine(model_dir)
    reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(prompts)]
    # Step 1: full prefill of r0, first chunk of r1, r2's prompt minus its last token.
    # Step 2: r1 the rest (a chunked prefill reaching back past the window), r2 one token.
    rows = run_chunks(engine, reqs, [{0: 11, 1: 9, 2: 4}, {1: 14, 2: 1}])
    assert len(rows) == 5
    for (req_id, pos), got in rows.items():
        np.testing.assert_allclose(got, expected[req_id][pos], **TOL)


def test_decode_steps_match_transformers(tmp_path):
    """Token-by-token decode after a prefill: the window slides over cached keys."""
    model_dir = save_tiny_gemma3(tmp_path / "m")
    tokens = np.random.default_rng(1).integers(0, 128, size=24).tolist()
    expected = hf_logits(model_dir, tokens)
    engine = tiny_engine(model_dir)
    req = engine_request("r", tokens, 3)
    rows = run_chunks(engine, [req], [{0: 6}] + [{0: 1}] * 18)
    for (_, pos), got in rows.items():
        np.testing.assert_allclose(got, expected[pos], **TOL)


def test_bfloat16_error_like_transformers_bfloat16(tmp_path):
    """In bfloat16 our logits stray from the float32 ones no more than (twice) transformers'
    own bfloat16 logits do."""
    import torch
    import transformers

    model_dir = save_tiny_gemma3(tmp_path / "m")
    tokens = list(range(3, 19))
    exact = hf_logits(model_dir, tokens)[-1]
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        hf_error = np.abs(hf_bf16(torch.tensor([tokens])).logits[0, -1].float().numpy() - exact).max()
    module, cfg, params = load_model(model_dir, jnp.bfloat16)
    engine = ModelEngine(module, cfg, params, EngineConfig(16, ENGINE_BLOCK, 32, 4, 64), jnp.bfloat16)
    logits = np.asarray(engine.forward([(engine_request("r", tokens, 1), 16)]).logits)
    assert np.abs(logits[0] - exact).max() <= 2 * hf_error


def test_config_reads_what_transformers_writes(tmp_path):
    cfg = gemma3.FAMILY.config_from_hf(read_json(save_tiny_gemma3(tmp_path / "m") / "config.json"))
    assert cfg.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert cfg.sliding_windows == (8, None, 8) and cfg.qk_norm and cfg.tie_word_embeddings
    assert (cfg.query_pre_attn_scalar, cfg.final_logit_softcapping) == (24.0, 1.5)
    # Global layers: base 1e5 and linear scaling by 4; sliding layers: base 1e3, unscaled.
    np.testing.assert_allclose(cfg.layer_inv_freq("full_attention")[1], 1e5 ** (-2 / 32) / 4, rtol=1e-6)
    np.testing.assert_allclose(cfg.layer_inv_freq("sliding_attention")[1], 1e3 ** (-2 / 32), rtol=1e-6)


def test_older_config_style_means_the_same():
    """Hub configs written before transformers 5 (Gemma 3 4B's, for one) spell rope and the
    layer pattern differently; both spellings give the same model config."""
    import transformers

    old_style = dict(
        architectures=["Gemma3ForCausalLM"], vocab_size=128, hidden_size=64, intermediate_size=96,
        num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
        sliding_window_pattern=3, sliding_window=16, query_pre_attn_scalar=32)
    new_style = transformers.Gemma3TextConfig(**old_style).to_dict()
    assert "rope_local_base_freq" not in new_style and "sliding_attention" in new_style["rope_parameters"]
    ours = gemma3.FAMILY.config_from_hf(old_style)
    assert ours == gemma3.FAMILY.config_from_hf(new_style)
    assert ours.layer_types == tuple(new_style["layer_types"])
    assert ours.rope_scaling == (("factor", 8.0), ("rope_type", "linear"))
    assert ours.sliding_windows == (16, 16, None, 16, 16, None, 16)
