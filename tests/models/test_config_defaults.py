"""A config.json that leaves a key out means transformers' config-class default for it (what
transformers and vLLM then compute with): each family's config read against the
transformers config class built from the same dict, for the keys that change numerics."""

import pytest
import transformers

from xla_inference.models import deepseek_v3, gemma3, mistral, mixtral, qwen2, qwen3_moe
from xla_inference.models.qwen2_5_vl import Qwen2_5_VLConfig

# Only what no default covers (sizes); everything else left out on purpose.
SIZES = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


def _theta(hf_config) -> float:
    return hf_config.rope_parameters["rope_theta"]


def test_mixtral_takes_its_own_rope_base_eps_and_no_window():
    ours = mixtral.MixtralConfig.from_hf(SIZES)
    ref = transformers.MixtralConfig(**SIZES)
    assert (ours.rope_theta, ours.rms_norm_eps) == (_theta(ref), ref.rms_norm_eps) == (1e6, 1e-5)
    assert ours.sliding_windows is None and ref.sliding_window is None
    assert (ours.moe.num_experts, ours.moe.num_experts_per_tok) == (
        ref.num_local_experts, ref.num_experts_per_tok)


def test_mistral_windows_every_layer_by_default():
    ours = mistral.MistralConfig.from_hf(SIZES)
    ref = transformers.MistralConfig(**SIZES)
    assert ours.sliding_windows == (ref.sliding_window,) * 4 and ref.sliding_window == 4096
    assert mistral.MistralConfig.from_hf({**SIZES, "sliding_window": None}).sliding_windows is None


def test_qwen_sliding_window_size_defaults_when_switched_on():
    hf = {**SIZES, "use_sliding_window": True, "max_window_layers": 2}
    ref = transformers.Qwen2Config(**hf)
    assert qwen2.Qwen2Config.from_hf(hf).sliding_windows == (None, None, 4096, 4096)
    assert ref.sliding_window == 4096 and ref.layer_types[2:] == ["sliding_attention"] * 2
    moe = {**hf, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    assert qwen3_moe.Qwen3MoeConfig.from_hf(moe).sliding_windows == (4096,) * 4


def test_qwen2_5_vl_text_and_vision_defaults():
    text = dict(SIZES, use_sliding_window=True,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
    hf = {"text_config": text, "vision_config": {"depth": 1, "hidden_size": 32,
                                                 "intermediate_size": 48, "num_heads": 2,
                                                 "out_hidden_size": 64}}
    ours = Qwen2_5_VLConfig.from_hf(hf)
    ref = transformers.Qwen2_5_VLConfig(**hf)
    assert (ours.rope_theta, ours.rms_norm_eps) == (_theta(ref.text_config),
                                                    ref.text_config.rms_norm_eps) == (1e6, 1e-5)
    assert ref.text_config.max_window_layers == 80  # beyond these 4 layers: no window
    assert ours.sliding_windows == tuple(
        4096 if kind == "sliding_attention" else None for kind in ref.text_config.layer_types)
    assert ours.tokens_per_second == ref.vision_config.tokens_per_second == 4


def test_gemma3_text_windows_its_sliding_layers_by_default():
    hf = {**SIZES, "layer_types": ["sliding_attention", "full_attention"] * 2}
    ours = gemma3.Gemma3Config.from_hf(hf)
    ref = transformers.Gemma3TextConfig(**hf)
    assert ours.sliding_windows == (ref.sliding_window, None) * 2 and ref.sliding_window == 4096


def test_deepseek_v3_routing_shared_experts_and_dense_layers_by_default():
    hf = {**SIZES, "num_hidden_layers": 5, "n_routed_experts": 16, "num_experts_per_tok": 4,
          "moe_intermediate_size": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
          "qk_rope_head_dim": 8, "v_head_dim": 16}
    ours = deepseek_v3.DeepseekV3Config.from_hf(hf)
    ref = transformers.DeepseekV3Config(**hf)
    assert (ours.moe.num_groups, ours.moe.topk_groups, ours.moe.routed_scaling_factor) == (
        ref.n_group, ref.topk_group, ref.routed_scaling_factor) == (8, 4, 2.5)
    assert (ours.num_shared_experts, ours.num_dense_layers, ours.q_lora_rank) == (
        ref.n_shared_experts, ref.first_k_dense_replace, ref.q_lora_rank) == (1, 3, 1536)
    lite = deepseek_v3.DeepseekV3Config.from_hf({**hf, "q_lora_rank": None})  # explicit null
    assert lite.q_lora_rank is None


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 5e5}])
def test_a_base_in_rope_parameters_wins_over_the_familys_default(rope):
    """transformers 5 writes the base inside rope_parameters only."""
    assert mixtral.MixtralConfig.from_hf({**SIZES, "rope_parameters": rope}).rope_theta == 5e5
