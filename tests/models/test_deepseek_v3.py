"""The native DeepSeek-V3 (multi-head latent attention, grouped sigmoid routing with shared
experts) against transformers on tiny random checkpoints, and its router against numpy."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import (assert_config_edit_names_tensor, assert_ragged_logits, engine_request,
                           hf_logits, read_json, run_chunks, save_tiny_model, tiny_engine)
from tests.models.test_families import TOL
from tests.models.test_moe import LAYER_TOL, _inputs, _random_moe
from xla_inference.layers.mla import MlaAttention
from xla_inference.layers.mlp import GatedMlp
from xla_inference.layers.moe import MoeConfig, MoeMlp, moe_mlp, moe_mlp_dense, route
from xla_inference.loading.params import WeightMismatchError
from xla_inference.models import deepseek_v3
from xla_inference.models.loader import load_model

# YaRN as the released configs use it, but with mscale != mscale_all_dim so that both of
# its corrections (the rotated q/k scale and the softmax scale) differ from 1.
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8,
        "rope_theta": 10000.0}

VARIANTS = {
    # q through q_a_proj / q_a_layernorm / q_b_proj; YaRN; interleaved rope weights.
    "lora-yarn": {},
    # q_proj straight from x; plain rope, rotate-half weights; L + R odd (the cache pads one
    # zero); routing weights not renormalised; two of two groups eligible.
    "no-lora": dict(q_lora_rank=None, rope_parameters={"rope_type": "default",
                                                       "rope_theta": 10000.0},
                    rope_interleave=False, kv_lora_rank=33, norm_topk_prob=False, topk_group=2),
}


def save_tiny_deepseek_v3(path, *, seed: int = 0, **overrides):
    """A 3-layer random DeepseekV3ForCausalLM (layer 0 dense, then MoE: 8 experts in 2
    groups, 2 per token, one shared expert), float32, with a random e_score_correction_bias
    (transformers initialises it to zeros) large enough to change which experts win.
    num_key_value_heads must equal the heads: transformers' eager attention repeats its
    expanded keys num_heads // num_key_value_heads times (and the class default is 128)."""
    import transformers
    from safetensors.numpy import load_file, save_file

    config = transformers.DeepseekV3Config(**{**dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48,
        kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=512,
        rope_parameters=YARN, rms_norm_eps=1e-6, initializer_range=0.1, bos_token_id=1,
        eos_token_id=2), **overrides})
    save_tiny_model(path, config, seed=seed)
    tensors = load_file(path / "model.safetensors")
    rng = np.random.default_rng(seed)
    for name in tensors:
        if name.endswith("e_score_correction_bias"):
            tensors[name] = (0.3 * rng.standard_normal(tensors[name].shape)).astype(np.float32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _check_switches_matter(model_dir):
    """The config switches this variant tests change transformers' logits, so that matching
    them proves they are applied."""
    hf = read_json(model_dir / "config.json")
    tokens = list(range(3, 40))
    as_configured = hf_logits(model_dir, tokens, attn_implementation="eager")
    for flip in (dict(rope_interleave=not hf["rope_interleave"]),
                 dict(topk_group=3 - hf["topk_group"])):
        flipped = hf_logits(model_dir, tokens, attn_implementation="eager", **flip)
        assert np.abs(flipped - as_configured).max() > 100 * TOL, flip


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_ragged(tmp_path, variant):
    model_dir = save_tiny_deepseek_v3(tmp_path / "m", **VARIANTS[variant])
    _check_switches_matter(model_dir)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, size=n).tolist() for n in (11, 23, 14)]
    expected = [hf_logits(model_dir, p, attn_implementation="eager") for p in prompts]
    engine = tiny_engine(model_dir)
    kinds = [(type(layer.attn), type(layer.mlp)) for layer in engine.params.layers]
    assert kinds == [(MlaAttention, GatedMlp)] + [(MlaAttention, MoeMlp)] * 2
    # Step 1: full prefill of r0, first chunk of r1, r2's prompt minus its last token.
    # Step 2: r1 the rest (a chunk of 14 after 9 cached tokens), r2 a decode step.
    assert_ragged_logits(engine, prompts, expected, [{0: 11, 1: 9, 2: 13}, {1: 14, 2: 1}], TOL)


def test_decode_steps_match_transformers(tmp_path):
    """Token-by-token decode, every key read back from the latent cache."""
    model_dir = save_tiny_deepseek_v3(tmp_path / "m", seed=1)
    tokens = np.random.default_rng(1).integers(0, 128, size=24).tolist()
    expected = hf_logits(model_dir, tokens, attn_implementation="eager")
    engine = tiny_engine(model_dir)
    rows = run_chunks(engine, [engine_request("r", tokens, 3)], [{0: 5}] + [{0: 1}] * 19)
    for (_, pos), got in rows.items():
        np.testing.assert_allclose(got, expected[pos], rtol=TOL, atol=TOL)


def test_cache_holds_only_the_latent(tmp_path):
    model_dir = save_tiny_deepseek_v3(tmp_path / "m", **VARIANTS["no-lora"])
    module, cfg, _ = load_model(model_dir, jnp.float32)
    # L + R = 33 + 16 = 49 values per token, split across K and V and padded to 2 x 25.
    assert [(layer.kind, layer.num_kv_heads, layer.head_size) for layer in module.kv_layers(cfg)
            ] == [("mla", 1, 49)] * 3  # one latent [c, k_rope] per token


def _grouped_sigmoid_cfg(k=2, norm=True, num_groups=4, topk_groups=2, scale=2.5):
    return MoeConfig(num_experts=8, num_experts_per_tok=k, intermediate_size=24,
                     norm_topk_prob=norm, scoring="grouped_sigmoid", num_groups=num_groups,
                     topk_groups=topk_groups, routed_scaling_factor=scale)


def _numpy_route(router, bias, x, cfg):
    """DeepSeek-V3's routing, written out per token in float64."""
    scores = 1 / (1 + np.exp(-(np.asarray(x, np.float64) @ np.asarray(router, np.float64))))
    weights, experts = [], []
    size = cfg.num_experts // cfg.num_groups
    for s in scores:
        biased = s + bias
        group_scores = [np.sort(biased[g * size:(g + 1) * size])[-2:].sum()
                        for g in range(cfg.num_groups)]
        groups = np.argsort(group_scores)[::-1][:cfg.topk_groups]
        eligible = np.concatenate([np.arange(g * size, (g + 1) * size) for g in groups])
        chosen = eligible[np.argsort(biased[eligible])[::-1][:cfg.num_experts_per_tok]]
        w = s[chosen] / s[chosen].sum() if cfg.norm_topk_prob else s[chosen]
        weights.append(w * cfg.routed_scaling_factor)
        experts.append(chosen)
    return np.array(weights), np.array(experts)


@pytest.mark.parametrize("cfg", [
    _grouped_sigmoid_cfg(), _grouped_sigmoid_cfg(k=3, norm=False, scale=1.0),
    _grouped_sigmoid_cfg(num_groups=2, topk_groups=1),
    _grouped_sigmoid_cfg(num_groups=1, topk_groups=1)])
def test_grouped_sigmoid_routing_matches_numpy(cfg):
    p, x = _random_moe(0), _inputs(0, 17)
    bias = 0.3 * np.random.default_rng(0).standard_normal(8)
    p.score_bias = jnp.asarray(bias, jnp.float32)
    weights, experts = route(p, x, cfg)
    want_weights, want_experts = _numpy_route(p.router, bias, x, cfg)
    np.testing.assert_array_equal(experts, want_experts)
    np.testing.assert_allclose(weights, want_weights, rtol=1e-5)
    if cfg.num_groups > cfg.topk_groups:  # every token's experts lie in its eligible groups
        size = 8 // cfg.num_groups
        assert all(len({e // size for e in row}) <= cfg.topk_groups for row in np.asarray(experts))


def test_grouped_sigmoid_with_shared_expert_equals_dense():
    p, x = _random_moe(1), _inputs(1, 13)
    keys = jax.random.split(jax.random.key(7), 3)
    p.score_bias = 0.3 * jax.random.normal(keys[0], (8,))
    p.shared_expert = GatedMlp(w_gate=jax.random.normal(keys[1], (20, 16)) / 4,
                               w_up=jax.random.normal(keys[2], (20, 16)) / 4,
                               w_down=jax.random.normal(keys[0], (16, 20)) / 4)
    cfg = _grouped_sigmoid_cfg()
    got = jax.jit(moe_mlp, static_argnums=2)(p, x, cfg)
    np.testing.assert_allclose(got, moe_mlp_dense(p, x, cfg), rtol=LAYER_TOL, atol=LAYER_TOL)
    without_shared = moe_mlp(MoeMlp(p.router, p.w_gate, p.w_up, p.w_down,
                                    score_bias=p.score_bias), x, cfg)
    assert np.abs(got - without_shared).max() > 0.1


def test_config_reads_the_released_layout():
    """DeepSeek-V3's own config.json: rope_scaling (type yarn) and a top-level rope_theta."""
    hf = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
              moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
              num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
              routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
              qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc",
              n_group=8, topk_group=4, num_experts_per_tok=8, moe_layer_freq=1,
              first_k_dense_replace=3, norm_topk_prob=True, scoring_func="sigmoid",
              max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000,
              rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                            "type": "yarn"}, tie_word_embeddings=False)
    cfg = deepseek_v3.FAMILY.config_from_hf(hf)
    assert cfg.moe == MoeConfig(num_experts=256, num_experts_per_tok=8, intermediate_size=2048,
                                norm_topk_prob=True, scoring="grouped_sigmoid", num_groups=8,
                                topk_groups=4, routed_scaling_factor=2.5)
    assert (cfg.num_dense_layers, cfg.rope_interleave, cfg.q_lora_rank) == (3, True, 1536)
    inv_freq, rope_scale = cfg.rope()
    assert inv_freq.shape == (32,) and rope_scale == 1.0  # mscale == mscale_all_dim
    mscale = 0.1 * np.log(40) + 1
    np.testing.assert_allclose(cfg.softmax_scale(), 192 ** -0.5 * mscale ** 2)
    # 576 cached values per token and layer: 2 x 288.
    assert deepseek_v3.kv_layers(cfg)[0].head_size == 576


@pytest.mark.parametrize("edit,tensor", [
    # A wider latent than the checkpoint's.
    (('"kv_lora_rank": 32', '"kv_lora_rank": 40'),
     "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"),
    # No q LoRA in the config, but the checkpoint has one.
    (('"q_lora_rank": 48', '"q_lora_rank": null'), "model.layers.0.self_attn.q_proj.weight"),
    # Two shared experts where the checkpoint has one.
    (('"n_shared_experts": 1', '"n_shared_experts": 2'),
     "model.layers.1.mlp.shared_experts.gate_proj.weight"),
    # Layer 1 made dense while the checkpoint holds experts there.
    (('"first_k_dense_replace": 1', '"first_k_dense_replace": 2'),
     "model.layers.1.mlp.gate_proj.weight"),
])
def test_mismatched_weights_name_the_tensor(tmp_path, edit, tensor):
    model_dir = save_tiny_deepseek_v3(tmp_path / "m")
    assert_config_edit_names_tensor(model_dir, edit, tensor)


def test_missing_score_bias_names_the_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    model_dir = save_tiny_deepseek_v3(tmp_path / "m")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.2.mlp.gate.e_score_correction_bias"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightMismatchError,
                       match=re.escape("'model.layers.2.mlp.gate.e_score_correction_bias'")):
        load_model(model_dir, jnp.float32)
