"""A config.json field that changes a family's math, which the family does not compute, is
refused when the config is read, naming the field (never served as if it were absent)."""

import pytest

from xla_inference.models import gemma3, llama, llama4, mistral, qwen2, qwen3

LLAMA_LIKE = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


@pytest.mark.parametrize("family", [llama.LlamaConfig, mistral.MistralConfig, qwen2.Qwen2Config,
                                    qwen3.Qwen3Config])
def test_silu_mlps_refuse_another_activation(family):
    assert family.from_hf({**LLAMA_LIKE, "hidden_act": "silu"}).hidden_size == 64
    assert family.from_hf(LLAMA_LIKE).hidden_size == 64  # transformers' default: silu
    with pytest.raises(ValueError, match="hidden_act silu or swish, not 'gelu'"):
        family.from_hf({**LLAMA_LIKE, "hidden_act": "gelu"})


def test_llama4_refuses_another_activation():
    with pytest.raises(ValueError, match="hidden_act silu or swish, not 'relu'"):
        llama4.Llama4Config.from_hf({**LLAMA_LIKE, "hidden_act": "relu"})


GEMMA3 = {**LLAMA_LIKE, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
          "layer_types": ["sliding_attention", "full_attention"]}


@pytest.mark.parametrize("field, value, match", [
    ("hidden_activation", "gelu", "hidden_activation gelu_pytorch_tanh, not 'gelu'"),
    ("attention_bias", True, "attention_bias"),
    ("use_bidirectional_attention", True, "use_bidirectional_attention"),
])
def test_gemma3_refuses_what_it_does_not_compute(field, value, match):
    assert gemma3.Gemma3Config.from_hf(GEMMA3).num_layers == 2
    assert gemma3.Gemma3Config.from_hf({**GEMMA3, "hidden_activation": "gelu_pytorch_tanh",
                                         "attention_bias": False}).num_layers == 2
    with pytest.raises(ValueError, match=match):
        gemma3.Gemma3Config.from_hf({**GEMMA3, field: value})


@pytest.mark.parametrize("scaling, match", [
    ({"rope_type": "yarn", "factor": 4.0}, "unsupported rope scaling 'yarn'"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
     "lacks 'original_max_position_embeddings'"),
])
def test_rope_scalings_not_turned_by_are_refused_when_the_config_is_read(scaling, match):
    assert llama.FAMILY.config_from_hf({**LLAMA_LIKE, "rope_scaling": {
        "rope_type": "linear", "factor": 2.0}}).rope_scaling
    with pytest.raises(ValueError, match=match):
        llama.FAMILY.config_from_hf({**LLAMA_LIKE, "rope_scaling": scaling})


def test_a_partial_rotary_factor_under_rope_scaling_is_refused():
    """transformers' scaled ropes turn only partial_rotary_factor of each head; its default
    rope ignores the key, and so may we."""
    linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert llama.LlamaConfig.from_hf({**LLAMA_LIKE, "partial_rotary_factor": 0.5}).head_dim == 16
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5 with rope scaling 'linear'"):
        llama.LlamaConfig.from_hf({**LLAMA_LIKE, "partial_rotary_factor": 0.5,
                                   "rope_parameters": linear})
    with pytest.raises(ValueError, match="partial_rotary_factor 0.25"):
        llama.LlamaConfig.from_hf({**LLAMA_LIKE,
                                   "rope_parameters": {**linear, "partial_rotary_factor": 0.25}})
