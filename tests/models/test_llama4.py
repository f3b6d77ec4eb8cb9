"""The native Llama 4 text model against transformers on tiny random checkpoints, and its
parts (the MoE block with its shared expert, the interleaved rope) against transformers'
own modules.

The tiny models have 4 layers, so that rope and NoPE layers, MoE and dense layers all
appear; chunks of 8 positions, much shorter than the test sequences. transformers runs with
eager attention; each comparison first checks that the chunk size and the temperature
tuning change transformers' logits, so that matching them proves they are applied.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import (assert_config_edit_names_tensor, assert_ragged_logits, engine_request,
                           hf_logits, read_json, run_chunks, save_tiny_family, tiny_engine)
from tests.models.test_families import TOL
from xla_inference.layers.mlp import GatedMlp
from xla_inference.layers.moe import MoeConfig, MoeMlp, moe_mlp, moe_mlp_dense
from xla_inference.layers.rope import apply_rope_interleaved, rope_inv_freq
from xla_inference.models import llama4

LAYER_TOL = 1e-5  # float32 both sides, one block
CHUNK = 8

VARIANTS = {
    # rope, rope + MoE, rope, NoPE + MoE; top-1 of 4 experts; q/k L2 norm; untied.
    "llama4": {},
    # NoPE first, MoE on layers 0 and 2 (an explicit list), top-2 of 4, llama3 rope
    # scaling that bends most frequencies, no q/k norm, tied embeddings.
    "llama4-top2-llama3": dict(
        no_rope_layers=[0, 1, 1, 1], moe_layers=[0, 2], num_experts_per_tok=2, use_qk_norm=False,
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16)),
}


def _check_switches_matter(model_dir, tokens, expected):
    """The chunk size and the temperature tuning each change transformers' logits."""
    unchunked = hf_logits(model_dir, tokens, attn_implementation="eager", attention_chunk_size=4096)
    np.testing.assert_allclose(unchunked[:CHUNK], expected[:CHUNK], rtol=TOL, atol=TOL)
    assert np.abs(unchunked[CHUNK:] - expected[CHUNK:]).max() > 100 * TOL
    untuned = hf_logits(model_dir, tokens, attn_implementation="eager",
                        attn_temperature_tuning=False)
    assert np.abs(untuned - expected).max() > 100 * TOL


def _layer_kinds(params) -> list[str]:
    return [type(layer.mlp).__name__ for layer in params.layers]


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_ragged(tmp_path, variant):
    model_dir = save_tiny_family(tmp_path / "m", "llama4", **VARIANTS[variant])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, size=n).tolist() for n in (11, 23, 14)]
    expected = [hf_logits(model_dir, p, attn_implementation="eager") for p in prompts]
    _check_switches_matter(model_dir, prompts[1], expected[1])
    engine = tiny_engine(model_dir)
    moe_layers = read_json(model_dir / "config.json")["moe_layers"]
    assert _layer_kinds(engine.params) == ["MoeMlp" if i in moe_layers else "GatedMlp"
                                           for i in range(4)]
    # Step 1: full prefill of r0, first chunk of r1, r2's prompt minus its last token.
    # Step 2: r1 the rest (from position 9, mid attention chunk), r2 a decode step at 13.
    assert_ragged_logits(engine, prompts, expected, [{0: 11, 1: 9, 2: 13}, {1: 14, 2: 1}], TOL)


def test_decode_steps_across_chunks_match_transformers(tmp_path):
    """Token-by-token decode through three attention chunks, every key read from the cache."""
    model_dir = save_tiny_family(tmp_path / "m", "llama4")
    tokens = np.random.default_rng(1).integers(0, 128, size=24).tolist()
    expected = hf_logits(model_dir, tokens, attn_implementation="eager")
    engine = tiny_engine(model_dir)
    rows = run_chunks(engine, [engine_request("r", tokens, 3)], [{0: 5}] + [{0: 1}] * 19)
    for (_, pos), got in rows.items():
        np.testing.assert_allclose(got, expected[pos], rtol=TOL, atol=TOL)


def _hf_moe_block(seed: int, k: int):
    """transformers' Llama4TextMoe with random weights (its experts start at zero)."""
    import torch
    import transformers
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    config = transformers.Llama4TextConfig(hidden_size=16, intermediate_size=24,
                                           num_local_experts=8, num_experts_per_tok=k)
    torch.manual_seed(seed)
    block = Llama4TextMoe(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-2 if p.dim() == 3 else -1]))
    return block


def _as_moe_mlp(block) -> MoeMlp:
    t = lambda x: jnp.asarray(x.detach().numpy())  # noqa: E731
    F = block.experts.expert_dim
    shared = block.shared_expert
    return MoeMlp(router=t(block.router.weight.T), w_gate=t(block.experts.gate_up_proj[..., :F]),
                  w_up=t(block.experts.gate_up_proj[..., F:]), w_down=t(block.experts.down_proj),
                  shared_expert=GatedMlp(w_gate=t(shared.gate_proj.weight),
                                         w_up=t(shared.up_proj.weight),
                                         w_down=t(shared.down_proj.weight)))


@pytest.mark.parametrize("T,k", [(13, 1), (29, 2), (1, 1)])
def test_moe_block_matches_transformers(T, k):
    """Sigmoid routing on the chosen logits, weights on the expert's input, shared expert:
    both the grouped and the dense path against transformers' Llama4TextMoe."""
    import torch

    block = _hf_moe_block(T, k)
    x = np.random.default_rng(T).standard_normal((T, 16)).astype(np.float32)
    with torch.no_grad():
        want = block(torch.from_numpy(x))[0].numpy()
    p = _as_moe_mlp(block)
    cfg = MoeConfig(num_experts=8, num_experts_per_tok=k, intermediate_size=24,
                    norm_topk_prob=False, scoring="sigmoid", weight_inputs=True)
    got = jax.jit(moe_mlp, static_argnums=2)(p, jnp.asarray(x), cfg)
    np.testing.assert_allclose(got, want, rtol=LAYER_TOL, atol=LAYER_TOL)
    np.testing.assert_allclose(moe_mlp_dense(p, jnp.asarray(x), cfg), want,
                               rtol=LAYER_TOL, atol=LAYER_TOL)
    # Weighting the output instead of the input is another function (SwiGLU is not linear).
    other = dataclasses.replace(cfg, weight_inputs=False)
    assert np.abs(np.asarray(moe_mlp(p, jnp.asarray(x), other)) - want).max() > 1e-3


def test_interleaved_rope_matches_transformers():
    import torch
    from transformers.models.llama4.modeling_llama4 import apply_rotary_emb

    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 7, 4, 32)).astype(np.float32)  # [T, N, H]
    positions = np.array([0, 1, 5, 9, 100, 255, 3], np.int32)
    inv_freq = rope_inv_freq(32, 10000.0)
    freqs = torch.polar(torch.ones(7, 16), torch.from_numpy(
        (positions[:, None] * inv_freq[None]).astype(np.float32)))
    want_q, want_k = apply_rotary_emb(torch.from_numpy(q)[None], torch.from_numpy(k)[None],
                                      freqs[None])
    for x, want in ((q, want_q), (k, want_k)):
        got = apply_rope_interleaved(jnp.asarray(x), jnp.asarray(positions), jnp.asarray(inv_freq))
        np.testing.assert_allclose(got, want[0].numpy(), rtol=1e-5, atol=1e-5)


def test_config_reads_the_llama4_switches():
    # As Llama 4 Scout and Maverick's text configs spell them (fields left out take
    # transformers' defaults: every 4th layer NoPE, chunks of 8192, q/k norm, tuning on).
    base = dict(vocab_size=8, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96,
                num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_local_experts=16, num_experts_per_tok=1)
    scout = llama4.FAMILY.config_from_hf({**base, "rope_scaling": dict(
        rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
        original_max_position_embeddings=8192)})
    assert scout.rope_layers == (True, True, True, False) * 2
    assert scout.attention_chunks == (8192, 8192, 8192, None) * 2
    assert scout.moe_layers == (True,) * 8 and scout.qk_l2_norm
    assert scout.temperature_tuning == (8192.0, 0.1) and scout.rope_theta == 500000.0
    assert scout.moe == MoeConfig(num_experts=16, num_experts_per_tok=1, intermediate_size=32,
                                  norm_topk_prob=False, scoring="sigmoid", weight_inputs=True)
    assert scout.intermediate_size == 96 and scout.rms_norm_eps == 1e-5
    assert dict(scout.rope_scaling)["rope_type"] == "llama3"
    maverick = llama4.FAMILY.config_from_hf({**base, "interleave_moe_layer_step": 2, "use_qk_norm": False,
                                      "attn_temperature_tuning": False, "rope_theta": 5e5,
                                      "no_rope_layers": [1, 1, 0, 1, 1, 1, 0, 1],
                                      "attention_chunk_size": 4096})
    assert maverick.moe_layers == (False, True) * 4 and not maverick.qk_l2_norm
    assert maverick.temperature_tuning is None and maverick.rope_scaling is None
    assert maverick.attention_chunks == (4096, 4096, None, 4096, 4096, 4096, None, 4096)


@pytest.mark.parametrize("edit,tensor", [
    # Experts (and shared expert) of another width than the config's.
    (('"intermediate_size": 48', '"intermediate_size": 32'),
     "model.layers.1.feed_forward.experts.gate_up_proj"),
    # Dense layers of another width.
    (('"intermediate_size_mlp": 96', '"intermediate_size_mlp": 64'),
     "model.layers.0.feed_forward.gate_proj.weight"),
    # A layer the config makes sparse holds a dense MLP.
    (('"moe_layers": [\n    1,', '"moe_layers": [\n    0,\n    1,'),
     "model.layers.0.feed_forward.router.weight"),
    # More experts than the checkpoint has: the router's shape tells.
    (('"num_local_experts": 4', '"num_local_experts": 8'),
     "model.layers.1.feed_forward.router.weight"),
])
def test_mismatched_weights_name_the_tensor(tmp_path, edit, tensor):
    model_dir = save_tiny_family(tmp_path / "m", "llama4")
    assert_config_edit_names_tensor(model_dir, edit, tensor)
