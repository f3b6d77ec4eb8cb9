"""The native Qwen2, Qwen3 and Mistral against transformers on tiny random checkpoints.

transformers runs with eager attention, whose sliding window is a plain mask; the window
tests also check that the window changes transformers' logits, so that matching them
proves the window is applied, not merely harmless.
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import (assert_ragged_logits, engine_request, hf_logits, read_json, run_chunks,
                           save_tiny_family, tiny_engine)
from xla_inference.loading.params import WeightMismatchError
from xla_inference.models import mistral, qwen2, qwen3
from xla_inference.models.loader import load_model

TOL = 2e-4  # float32 both sides; rtol and atol
WINDOW = 8

VARIANTS = {
    "qwen2": ("qwen2", {}),
    # Layer 0 full, layer 1 sliding (transformers' max_window_layers); tied embeddings.
    "qwen2-window-tied": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW,
                                        max_window_layers=1, tie_word_embeddings=True)),
    "qwen3": ("qwen3", {}),
    "qwen3-mha": ("qwen3", dict(num_key_value_heads=4)),
    "mistral": ("mistral", {}),  # window 8 on both layers
}


def _expected(model_dir, tokens):
    """transformers' logits; where the config has a window, check that it matters."""
    expected = hf_logits(model_dir, tokens, attn_implementation="eager")
    if read_json(model_dir / "config.json").get("sliding_window"):
        # A window wider than the sequence (transformers' sliding layers refuse None).
        unwindowed = hf_logits(model_dir, tokens, attn_implementation="eager", sliding_window=4096)
        np.testing.assert_allclose(unwindowed[:WINDOW], expected[:WINDOW], rtol=TOL, atol=TOL)
        assert np.abs(unwindowed[WINDOW:] - expected[WINDOW:]).max() > 100 * TOL
    return expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_ragged(tmp_path, variant):
    family, overrides = VARIANTS[variant]
    model_dir = save_tiny_family(tmp_path / "m", family, **overrides)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, size=n).tolist() for n in (11, 23, 14)]
    expected = [_expected(model_dir, p) for p in prompts]
    engine = tiny_engine(model_dir)
    # Step 1: full prefill of r0, first chunk of r1, r2's prompt minus its last token.
    # Step 2: r1 the rest (a chunk starting past the window), r2 one token at position 13.
    assert_ragged_logits(engine, prompts, expected, [{0: 11, 1: 9, 2: 13}, {1: 14, 2: 1}], TOL)


@pytest.mark.parametrize("variant", ["qwen2-window-tied", "mistral"])
def test_windowed_decode_steps_match_transformers(tmp_path, variant):
    """Token-by-token decode far past the window, every key read back from the cache."""
    family, overrides = VARIANTS[variant]
    model_dir = save_tiny_family(tmp_path / "m", family, **overrides)
    tokens = np.random.default_rng(1).integers(0, 128, size=24).tolist()
    expected = _expected(model_dir, tokens)
    engine = tiny_engine(model_dir)
    rows = run_chunks(engine, [engine_request("r", tokens, 3)], [{0: 5}] + [{0: 1}] * 19)
    for (_, pos), got in rows.items():
        np.testing.assert_allclose(got, expected[pos], rtol=TOL, atol=TOL)


def test_configs_read_the_family_switches():
    base = dict(vocab_size=8, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2)
    assert qwen2.FAMILY.config_from_hf(base).qkv_bias and not qwen2.FAMILY.config_from_hf(base).o_bias
    # Released Qwen2.5 configs carry a window size but leave it switched off.
    assert qwen2.FAMILY.config_from_hf({**base, "sliding_window": 32768}).sliding_windows is None
    # No layer_types (configs saved before transformers wrote them): max_window_layers decides.
    windowed = {**base, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
    assert qwen2.FAMILY.config_from_hf(windowed).sliding_windows == (None, 8, 8)
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    assert qwen3.FAMILY.config_from_hf({**windowed, "layer_types": types}).sliding_windows == (8, None, 8)
    q3 = qwen3.FAMILY.config_from_hf({**base, "head_dim": 128})
    assert q3.qk_norm and q3.head_dim == 128 and not q3.qkv_bias
    assert mistral.FAMILY.config_from_hf({**base, "sliding_window": 4096}).sliding_windows == (4096,) * 3
    assert mistral.FAMILY.config_from_hf({**base, "sliding_window": None}).sliding_windows is None


@pytest.mark.parametrize("family,edit,tensor", [
    # A Qwen3 checkpoint read as Qwen2: no q/k/v biases.
    ("qwen3", ("Qwen3ForCausalLM", "Qwen2ForCausalLM"), "q_proj.bias"),
    # A Qwen2 checkpoint read as Qwen3: no q/k norms.
    ("qwen2", ("Qwen2ForCausalLM", "Qwen3ForCausalLM"), "q_norm.weight"),
    ("mistral", ('"head_dim": 32', '"head_dim": 16'), "q_proj.weight"),
])
def test_mismatched_weights_name_the_tensor(tmp_path, family, edit, tensor):
    model_dir = save_tiny_family(tmp_path / "m", family)
    cfg_path = model_dir / "config.json"
    text = cfg_path.read_text()
    assert edit[0] in text
    cfg_path.write_text(text.replace(*edit))
    with pytest.raises(WeightMismatchError, match=re.escape(f"model.layers.0.self_attn.{tensor}")):
        load_model(model_dir, jnp.float32)
