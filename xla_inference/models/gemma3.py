"""Gemma 3 text models (Gemma3ForCausalLM: 270M, 1B, and the text tower of the larger ones).

What sets Gemma 3 apart from Llama: (1 + w) RMSNorms, also on q and k per head and after
attention and the MLP; an embedding scaled by sqrt(hidden); a GeGLU MLP; scores scaled by
query_pre_attn_scalar; sliding-window layers interleaved with global ones, each kind with
its own rope base (and rope scaling on the global layers only); optional soft-capping of
the final logits.

Attention-logit soft-capping is not applied even when a config sets
`attn_logit_softcapping`: Gemma 3 replaced it with the q/k norms, and both transformers'
and vLLM's Gemma 3 ignore the field, so applying it would disagree with every reference.
"""

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.kernels.metadata import KvCache
from xla_inference.layers.attention import SelfAttention, self_attention
from xla_inference.layers.mlp import GatedMlp, gated_mlp
from xla_inference.layers.norms import gemma_rms_norm
from xla_inference.layers.rope import rope_inv_freq
from xla_inference.loading.params import tensor_getter
from xla_inference.lora.slots import embed_lookup
from xla_inference.models.decoder import (DecoderConfig, decoder_family, decoder_fields,
                                          load_attention, load_gated_mlp, load_lm_head,
                                          run_layers, with_hf_defaults)
from xla_inference.models.decoder import compute_logits as _head_logits
from xla_inference.parallel.axes import weight
from xla_inference.models.interface import StepBatch

_SLIDING = "sliding_attention"
_GLOBAL = "full_attention"
_gelu_tanh = functools.partial(jax.nn.gelu, approximate=True)  # HF's gelu_pytorch_tanh


# transformers' Gemma3TextConfig defaults: the Hub's configs (gemma-3-4b-it's text_config)
# leave out the fields that keep them, and a text-only config may too (its sliding window).
HF_TEXT_DEFAULTS = {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
                    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                    "head_dim": 256, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
                    "rope_local_base_freq": 10_000.0, "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "sliding_window_pattern": 6}


def _rope_parameters(hf: Mapping) -> tuple[dict, dict]:
    """(global layers' rope parameters, sliding layers'), rope_theta included, from either
    config style: transformers >= 5 writes `rope_parameters` per layer type; older configs
    (those on the Hub) give `rope_theta` and `rope_scaling` for global layers and
    `rope_local_base_freq` for sliding ones."""
    per_type = hf.get("rope_parameters") or {}
    if _GLOBAL in per_type or _SLIDING in per_type:
        global_params, local_params = dict(per_type.get(_GLOBAL) or {}), dict(per_type.get(_SLIDING) or {})
    else:
        global_params = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1_000_000.0)}
        local_params = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    for params in (global_params, local_params):  # "default" is what no scaling means
        if params.get("rope_type", params.get("type")) == "default":
            params.pop("rope_type", None)
            params.pop("type", None)
    return global_params, local_params


def _layer_types(hf: Mapping) -> tuple[str, ...]:
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    # Older configs: every `sliding_window_pattern`-th layer is global.
    pattern = hf.get("sliding_window_pattern", 6)
    return tuple(_GLOBAL if (i + 1) % pattern == 0 else _SLIDING for i in range(hf["num_hidden_layers"]))


@dataclasses.dataclass(frozen=True)
class Gemma3Config(DecoderConfig):
    """DecoderConfig's rope_theta and rope_scaling are the global layers'; sliding_windows
    holds the window of each sliding layer (None for the global ones)."""

    layer_types: tuple[str, ...] = ()  # "sliding_attention" or "full_attention" per layer
    local_rope: tuple = ()  # sliding layers' rope parameters as sorted pairs, rope_theta included
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None

    @classmethod
    def from_hf(cls, hf: Mapping) -> "Gemma3Config":
        hf = with_hf_defaults(hf, HF_TEXT_DEFAULTS)
        global_rope, local_rope = _rope_parameters(hf)
        layer_types = _layer_types(hf)
        window = hf.get("sliding_window")
        refusals = [(hf.get("attention_bias"), "attention_bias"),
                    (hf.get("use_bidirectional_attention"), "use_bidirectional_attention")]
        for refused, field in refusals:
            if refused:
                raise ValueError(f"xla-inference does not serve Gemma 3 checkpoints with {field}")
        fields = decoder_fields(hf, ("gelu_pytorch_tanh",), "hidden_activation")
        fields.update(
            rope_theta=float(global_rope.pop("rope_theta", 1_000_000.0)),
            rope_scaling=tuple(sorted(global_rope.items())) or None,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
        return cls(
            **fields, qk_norm=True,
            sliding_windows=tuple(window if kind == _SLIDING else None for kind in layer_types),
            layer_types=layer_types,
            local_rope=tuple(sorted(local_rope.items())),
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
        )

    def layer_inv_freq(self, layer_type: str) -> np.ndarray:
        if layer_type == _GLOBAL:
            return self.inv_freq()
        params = dict(self.local_rope)
        return rope_inv_freq(self.head_dim, float(params.pop("rope_theta", 10_000.0)), params)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Gemma3Layer:
    input_norm: jax.Array  # [D]
    attn: SelfAttention  # with q_norm, k_norm [H]
    post_attn_norm: jax.Array  # [D]
    pre_mlp_norm: jax.Array  # [D]
    mlp: GatedMlp
    post_mlp_norm: jax.Array  # [D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Gemma3Params:
    embed: jax.Array = weight("vocab", "embed")  # [V, D]
    layers: list[Gemma3Layer] = weight()
    final_norm: jax.Array = weight()  # [D]
    # [V, D]: the embedding's host array when tied; multiplied by linear.project
    lm_head: jax.Array = weight("vocab", "embed", projection=True)


def _load_layer(get, prefix: str, cfg: Gemma3Config) -> Gemma3Layer:
    norm = lambda name: get(f"{prefix}{name}.weight", (cfg.hidden_size,))  # noqa: E731
    return Gemma3Layer(
        input_norm=norm("input_layernorm"),
        attn=load_attention(get, prefix + "self_attn.", cfg),
        post_attn_norm=norm("post_attention_layernorm"),
        pre_mlp_norm=norm("pre_feedforward_layernorm"),
        mlp=load_gated_mlp(get, prefix + "mlp.", cfg.hidden_size, cfg.intermediate_size),
        post_mlp_norm=norm("post_feedforward_layernorm"),
    )


def load_params(tensors: Mapping[str, np.ndarray], cfg: Gemma3Config, dtype) -> Gemma3Params:
    """HF-named tensors ([out, in] linear weights; norms as HF stores them, y = x * (1 + w))."""
    get = tensor_getter(tensors, dtype)
    embed = get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
    return Gemma3Params(
        embed=embed,
        layers=[_load_layer(get, f"model.layers.{i}.", cfg) for i in range(cfg.num_layers)],
        final_norm=get("model.norm.weight", (cfg.hidden_size,)),
        lm_head=load_lm_head(get, embed, cfg.tie_word_embeddings),
    )


@functools.partial(jax.jit, static_argnames=("cfg", "window"))  # traced once: see decoder._layer
def _decoder_layer(layer: Gemma3Layer, x, kv, batch: StepBatch, cfg: Gemma3Config, inv_freq, window,
                   mask_positions=None):
    norm = functools.partial(gemma_rms_norm, eps=cfg.rms_norm_eps)
    kv, attn = self_attention(
        layer.attn, norm(x, layer.input_norm), kv, batch.attention, inv_freq, head_dim=cfg.head_dim,
        scale=cfg.query_pre_attn_scalar**-0.5, norm_eps=cfg.rms_norm_eps,
        sliding_window=window, qk_norm=gemma_rms_norm, mask_positions=mask_positions)
    x = x + norm(attn, layer.post_attn_norm)
    mlp_out = gated_mlp(layer.mlp, norm(x, layer.pre_mlp_norm), act=_gelu_tanh)
    return kv, x + norm(mlp_out, layer.post_mlp_norm)


def forward(params: Gemma3Params, kv_cache: KvCache, batch: StepBatch, cfg: Gemma3Config):
    """(params, kv_cache, batch) -> (kv_cache, hidden [T, D]) after the final norm."""
    inv_freqs = {kind: jnp.asarray(cfg.layer_inv_freq(kind)) for kind in set(cfg.layer_types)}
    # HF rounds the scale to the weights' dtype first (sqrt(640) -> 25.25 in bfloat16).
    embed_scale = jnp.asarray(np.float32(cfg.hidden_size**0.5), params.embed.dtype)
    x = embed_lookup(params.embed, batch.input_ids) * embed_scale

    def step(layer, x, kv, kind, window):
        return _decoder_layer(layer, x, kv, batch, cfg, inv_freqs[kind], window)

    windows = [cfg.sliding_window(i) for i in range(cfg.num_layers)]
    kv_cache, x = run_layers(step, params.layers, kv_cache, x, cfg.layer_types, windows)
    return kv_cache, gemma_rms_norm(x, params.final_norm, cfg.rms_norm_eps)


def compute_logits(params: Gemma3Params, hidden: jax.Array, cfg: Gemma3Config) -> jax.Array:
    """hidden [B, D] -> logits [B, V] in float32, soft-capped where the config asks."""
    logits = _head_logits(params, hidden)
    cap = cfg.final_logit_softcapping
    return logits if cap is None else cap * jnp.tanh(logits / cap)


FAMILY = decoder_family("gemma3", ("Gemma3ForCausalLM",), Gemma3Config, load_params=load_params,
                        forward=forward, compute_logits=compute_logits)
