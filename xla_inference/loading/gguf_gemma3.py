"""Gemma 3 GGUF (architecture `gemma3`, text only) -> Hugging Face Gemma3ForCausalLM.

Names and values follow transformers' own GGUF loader, so that a converted file loads to
the same weights it does (tests compare them bit for bit). Two things llama.cpp's
converter changed are undone here: it stores every Gemma norm weight with the 1 of
`x * (1 + w)` already added, and it renames the four per-layer norms. q/k rows are not
permuted for Gemma (llama.cpp runs it with NEOX-style rope, as HF does).

What the GGUF does not record, llama.cpp hard-codes for Gemma 3, and so do we: a global
layer after every five sliding ones, a rope base of 10000 for the sliding layers, and
query_pre_attn_scalar = head_dim, except for the 27B model (62 layers), whose config says
hidden_size / num_heads (168), as llama.cpp uses for it. A file without a sliding window
(none, or 0) has no sliding layers, as llama.cpp reads it. The GGUF keys that could say
otherwise (`attention.sliding_window_pattern`, `rope.freq_base_swa`, and a sliding layer's
own head sizes) llama.cpp does not read for Gemma 3; a file that carries one with another
value than the hard-coded one is refused by name rather than served as the code says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable

import numpy as np

from xla_inference.loading.gguf import (LLAMA_LAYER_NAMES, HFTensors, Recipe, arch_key,
                                        check_head_dims, check_tied, common_hf_config,
                                        gguf_rope_parameters, hf_name, refuse_bias_tensors,
                                        refuse_per_layer_values)

_SLIDING_WINDOW_PATTERN = 6
_LOCAL_ROPE_THETA = 10_000.0

# Llama's names, but ffn_norm is the pre-MLP norm and there are four more norms.
_LAYER_NAMES = {
    **LLAMA_LAYER_NAMES,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def gemma3_hf_config_from_gguf(metadata: dict[str, Any], tensor_names: Iterable[str]) -> dict[str, Any]:
    """A Hugging Face Gemma3TextConfig dict (config.json) for a `gemma3` GGUF."""
    arch = metadata.get("general.architecture")
    if arch != "gemma3":
        raise ValueError(f"expected a GGUF of architecture 'gemma3', got {arch!r}")
    refuse_per_layer_values(metadata)
    get = lambda suffix, default=None: arch_key(metadata, suffix, default)  # noqa: E731
    num_layers = int(get("block_count"))
    num_heads = int(get("attention.head_count"))
    hidden_size = int(get("embedding_length"))
    head_dim = int(get("attention.key_length"))
    check_head_dims(metadata, head_dim)
    # The file's rope scaling (linear, as llama.cpp reads it) turns the global layers only.
    global_rope = gguf_rope_parameters(metadata, float(get("rope.freq_base", 1_000_000.0)),
                                       head_dim)
    final_cap = metadata.get("gemma3.final_logit_softcapping")
    window = int(get("attention.sliding_window", 0))
    sliding = [window > 0 and (i + 1) % _SLIDING_WINDOW_PATTERN != 0 for i in range(num_layers)]
    _refuse_other_sliding_layers(metadata, sliding, head_dim)
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": hidden_size,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "query_pre_attn_scalar": _query_pre_attn_scalar(num_layers, hidden_size, num_heads,
                                                        head_dim),
        "sliding_window": window if window > 0 else None,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_parameters": {
            "full_attention": global_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": _LOCAL_ROPE_THETA},
        },
        "final_logit_softcapping": None if final_cap is None else float(final_cap),
        "attn_logit_softcapping": None,
        "attention_bias": False,
        **common_hf_config(metadata, tensor_names),
    }


def _refuse_other_sliding_layers(metadata: dict[str, Any], sliding: list[bool],
                                 head_dim: int) -> None:
    """The sliding layers' keys a `gemma3` GGUF may carry, each refused where it says other
    than what is served (`sliding`: each layer's, llama.cpp's hard-coded pattern)."""
    get = lambda suffix: metadata.get(f"gemma3.{suffix}")  # noqa: E731
    pattern = get("attention.sliding_window_pattern")
    if pattern is not None:
        period = _SLIDING_WINDOW_PATTERN if any(sliding) else 0
        if (list(pattern) != sliding) if isinstance(pattern, list) else (int(pattern) != period):
            raise ValueError(f"GGUF gemma3.attention.sliding_window_pattern {pattern!r}: "
                             "xla-inference serves Gemma 3 as llama.cpp does, a global layer "
                             f"after every {_SLIDING_WINDOW_PATTERN - 1} sliding ones")
    base = get("rope.freq_base_swa")
    if base is not None and float(base) != _LOCAL_ROPE_THETA:
        raise ValueError(f"GGUF gemma3.rope.freq_base_swa {base}: xla-inference serves Gemma "
                         f"3's sliding layers with llama.cpp's rope base {_LOCAL_ROPE_THETA:g}")
    for suffix in ("attention.key_length_swa", "attention.value_length_swa",
                   "rope.dimension_count_swa"):
        value = get(suffix)
        if value is not None and int(value) != head_dim:
            raise ValueError(f"GGUF gemma3.{suffix} {value} is not the head size {head_dim}: "
                             "xla-inference serves sliding and global layers with the same "
                             "heads")


_GEMMA3_27B_LAYERS = 62


def _query_pre_attn_scalar(num_layers: int, hidden_size: int, num_heads: int,
                           head_dim: int) -> float:
    """Gemma 3's attention scale is query_pre_attn_scalar ** -0.5: head_dim for every size
    but 27B, whose checkpoints (and llama.cpp, by its layer count) take hidden / heads."""
    if num_layers == _GEMMA3_27B_LAYERS:
        return hidden_size / num_heads
    return head_dim


def gemma3_hf_state_dict_from_gguf(tensors: Mapping[str, np.ndarray], config: dict[str, Any]) -> HFTensors:
    """GGUF tensors (numpy order) -> HF Gemma3ForCausalLM names, norms back to HF's w (as
    transformers' loader does, w = stored - 1 in float32), made on access."""
    check_tied(tensors, config)
    refuse_bias_tensors(tensors, "gemma3")
    recipes = {}
    for name in tensors:
        subtract = 1.0 if name.endswith("norm.weight") else 0.0
        recipes[hf_name(name, _LAYER_NAMES, "Gemma 3")] = Recipe(name, subtract=subtract)
    return HFTensors(tensors, recipes)
