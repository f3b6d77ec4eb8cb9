"""Llama 4 text models (Llama4ForCausalLM: the language model of Llama 4 Scout and Maverick).

What sets Llama 4 apart from Llama 3:
- rope pairs adjacent elements of a head (Meta's complex-number layout), not its halves;
- layers alternate between rope layers, whose attention is local to fixed chunks of
  `attention_chunk_size` positions (a query at position p sees keys of positions
  p // chunk * chunk .. p) and whose q and k are L2-normalised per head after rope
  (`use_qk_norm`), and NoPE layers (`no_rope_layers[i] == 0`): no rope, global causal
  attention, and queries scaled by log1p(floor((p + 1) / floor_scale)) * attn_scale + 1
  (`attn_temperature_tuning`);
- MoE layers (`moe_layers`, or every `interleave_moe_layer_step`-th) route each token to
  its top-k experts (k = 1 in the released models) with a sigmoid of the chosen logits
  that scales the token before the expert, and add a shared expert that every token goes
  through; the other layers keep a dense MLP of `intermediate_size_mlp`.

Checkpoint names: `model.layers.{i}.feed_forward.` + `router.weight` [E, D],
`experts.gate_up_proj` [E, D, 2F] (gate, then up; already [in, out]),
`experts.down_proj` [E, F, D] and `shared_expert.{gate,up,down}_proj.weight`; dense
layers `feed_forward.{gate,up,down}_proj.weight`.
"""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.kernels.metadata import KvCache
from xla_inference.layers.attention import SelfAttention, paged_attention
from xla_inference.layers.linear import linear
from xla_inference.layers.moe import MoeConfig, MoeMlp
from xla_inference.layers.norms import l2_norm, rms_norm
from xla_inference.layers.rope import apply_rope_interleaved
from xla_inference.loading.params import part
from xla_inference.models import decoder
from xla_inference.models.decoder import (DecoderConfig, DecoderLayer, DecoderParams,
                                          decoder_family, decoder_fields, load_gated_mlp,
                                          mlp_block, run_layers)
from xla_inference.models.interface import StepBatch

_CHUNKED = "chunked_attention"


def _rope_layers(hf: Mapping) -> tuple[bool, ...]:
    """Per layer: rope (True) or NoPE, as transformers' Llama4TextConfig decides."""
    num_layers, interval = hf["num_hidden_layers"], hf.get("no_rope_layer_interval", 4)
    flags = hf.get("no_rope_layers") or [(i + 1) % interval != 0 for i in range(num_layers)]
    return tuple(bool(f) for f in flags[:num_layers])


def _moe_layers(hf: Mapping) -> tuple[bool, ...]:
    num_layers, step = hf["num_hidden_layers"], hf.get("interleave_moe_layer_step", 1)
    moe = hf.get("moe_layers")
    moe = set(range(step - 1, num_layers, step) if moe is None else moe)
    return tuple(i in moe for i in range(num_layers))


def _attention_chunks(hf: Mapping, rope_layers: tuple[bool, ...]) -> tuple[int | None, ...]:
    """Per layer: the chunk local attention is confined to, or None for global attention."""
    chunk = hf.get("attention_chunk_size", 8192)
    types = hf.get("layer_types") or [_CHUNKED if rope else "full_attention"
                                       for rope in rope_layers]
    return tuple(chunk if kind == _CHUNKED else None for kind in types)


@dataclasses.dataclass(frozen=True)
class Llama4Config(DecoderConfig):
    """DecoderConfig's intermediate_size is the dense layers' MLP width
    (`intermediate_size_mlp`); `moe.intermediate_size` is each expert's and the shared
    expert's (`intermediate_size`)."""

    moe_layers: tuple[bool, ...] = ()  # per layer: experts (True) or the dense MLP
    rope_layers: tuple[bool, ...] = ()  # per layer: rope (True) or NoPE
    attention_chunks: tuple[int | None, ...] = ()  # per layer: local attention chunk, or None
    qk_l2_norm: bool = False  # L2-normalise q and k per head on rope layers
    temperature_tuning: tuple[float, float] | None = None  # (floor_scale, attn_scale), NoPE layers

    @classmethod
    def from_hf(cls, hf: Mapping) -> "Llama4Config":
        fields = decoder_fields(hf)
        rope = hf.get("rope_parameters") or {}
        fields.update(
            intermediate_size=hf.get("intermediate_size_mlp", 16384),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta", 500000.0)),
        )
        bias = bool(hf.get("attention_bias", False))
        moe = MoeConfig(num_experts=hf.get("num_local_experts", 16),
                        num_experts_per_tok=hf.get("num_experts_per_tok", 1),
                        intermediate_size=hf["intermediate_size"], norm_topk_prob=False,
                        scoring="sigmoid", weight_inputs=True)
        rope_layers = _rope_layers(hf)
        tuning = (float(hf.get("floor_scale", 8192)), float(hf.get("attn_scale", 0.1)))
        return cls(**fields, qkv_bias=bias, o_bias=bias, moe=moe, moe_layers=_moe_layers(hf),
                   rope_layers=rope_layers, attention_chunks=_attention_chunks(hf, rope_layers),
                   qk_l2_norm=bool(hf.get("use_qk_norm", True)),
                   temperature_tuning=tuning if hf.get("attn_temperature_tuning", True) else None)


def _load_moe(get, prefix: str, cfg: Llama4Config) -> MoeMlp:
    D, E, F = cfg.hidden_size, cfg.moe.num_experts, cfg.moe.intermediate_size
    router = get(prefix + "router.weight", (E, D), True)
    gate_up = get(prefix + "experts.gate_up_proj", (E, D, 2 * F))  # [E, D, 2F]: gate, then up
    return MoeMlp(router=router, w_gate=part(gate_up, (..., slice(0, F))),
                  w_up=part(gate_up, (..., slice(F, 2 * F))),
                  w_down=get(prefix + "experts.down_proj", (E, F, D)),
                  shared_expert=load_gated_mlp(get, prefix + "shared_expert.", D, F))


def load_params(tensors: Mapping[str, np.ndarray], cfg: Llama4Config, dtype) -> DecoderParams:
    """HF-named tensors -> the decoder's params; MLPs from `feed_forward.`."""
    def load_mlp(get, i: int):
        prefix = f"model.layers.{i}.feed_forward."
        if cfg.moe_layers[i]:
            return _load_moe(get, prefix, cfg)
        return load_gated_mlp(get, prefix, cfg.hidden_size, cfg.intermediate_size)

    return decoder.load_params(tensors, cfg, dtype, load_mlp)


def _temperature(positions: jax.Array, floor_scale: float, attn_scale: float) -> jax.Array:
    """Query scale [T, 1, 1] of NoPE layers: grows with the log of the position."""
    pos = positions.astype(jnp.float32)
    return (jnp.log1p(jnp.floor((pos + 1.0) / floor_scale)) * attn_scale + 1.0)[:, None, None]


def _attention(p: SelfAttention, x, kv, batch: StepBatch, cfg: Llama4Config, layer: int,
               inv_freq):
    """x [T, D] (normed) -> (updated kv, out [T, D])."""
    T, H = x.shape[0], cfg.head_dim
    q = linear(x, p.wq, p.bq).reshape(T, -1, H)  # [T, N, H]
    k = linear(x, p.wk, p.bk).reshape(T, -1, H)  # [T, K, H]
    v = linear(x, p.wv, p.bv).reshape(T, -1, H)
    if cfg.rope_layers[layer]:
        q = apply_rope_interleaved(q, batch.attention.positions, inv_freq)
        k = apply_rope_interleaved(k, batch.attention.positions, inv_freq)
        if cfg.qk_l2_norm:  # after rope, unlike Qwen3's q/k norms
            q, k = l2_norm(q, cfg.rms_norm_eps), l2_norm(k, cfg.rms_norm_eps)
    elif cfg.temperature_tuning:
        q = (q * _temperature(batch.attention.positions, *cfg.temperature_tuning)).astype(q.dtype)
    kv, out = paged_attention(q, k, v, kv, batch.attention, scale=H**-0.5,
                              attention_chunk=cfg.attention_chunks[layer])
    return kv, linear(out.reshape(T, -1), p.wo, p.bo)


def _layer(layer: DecoderLayer, x, kv, batch: StepBatch, cfg: Llama4Config, i: int, inv_freq):
    h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
    kv, attn = _attention(layer.attn, h, kv, batch, cfg, i, inv_freq)
    x = x + attn
    h = rms_norm(x, layer.post_attn_norm, cfg.rms_norm_eps)
    return kv, x + mlp_block(layer.mlp, h, cfg, batch.attention.real_tokens())


def forward(params: DecoderParams, kv_cache: KvCache, batch: StepBatch, cfg: Llama4Config):
    """(params, kv_cache, batch) -> (kv_cache, hidden [T, D]) after the final norm."""
    return forward_inputs(params, kv_cache, batch, cfg, params.embed[batch.input_ids])


def forward_inputs(params: DecoderParams, kv_cache: KvCache, batch: StepBatch, cfg: Llama4Config,
                   x: jax.Array):
    """forward from the tokens' input rows x [T, D] (models/llama4_mm.py puts an image
    encoder's rows in place of its placeholder tokens' embeddings)."""
    inv_freq = jnp.asarray(cfg.inv_freq())
    step = lambda layer, x, kv, i: _layer(layer, x, kv, batch, cfg, i, inv_freq)  # noqa: E731
    kv_cache, x = run_layers(step, params.layers, kv_cache, x, range(cfg.num_layers))
    return kv_cache, rms_norm(x, params.final_norm, cfg.rms_norm_eps)


# Chunked local layers report full attention to vLLM (every page kept): correct, and
# vLLM's chunked-local spec would free pages the kernel's chunk mask never reads anyway.
FAMILY = decoder_family("llama4", ("Llama4ForCausalLM",), Llama4Config,
                        load_params=load_params, forward=forward)
