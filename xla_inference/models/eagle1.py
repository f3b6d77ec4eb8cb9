"""The EAGLE-1 draft head for Llama-family targets (vLLM's `eagle` speculative method).

At a position p: the embedding e of the token at p + 1 and the target's final (normed)
hidden state h at p, x = fc([e, h]) (2D -> D, no bias); then the head's decoder layers,
the first without its input norm; no final norm; the target's own LM head over the
residual stream gives the draft, and that stream is fed back as h past the target's
tokens. Checkpoint names (vLLM's): `fc.weight`, `layers.{i}.*`, an optional
`embed_tokens.weight` (else the target's is shared).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.layers.attention import self_attention
from xla_inference.layers.linear import project
from xla_inference.layers.mlp import gated_mlp
from xla_inference.layers.norms import rms_norm
from xla_inference.loading.params import tensor_getter
from xla_inference.models import decoder
from xla_inference.models.interface import FULL, KvLayer, StepBatch


@dataclasses.dataclass(frozen=True)
class Eagle1Config(decoder.DecoderConfig):
    @classmethod
    def from_hf(cls, hf: Mapping) -> Eagle1Config:
        for key in ("mlp_bias", "attention_bias"):
            if hf.get(key):
                raise ValueError(f"xla-inference does not serve EAGLE heads with {key} yet")
        return cls(**decoder.decoder_fields(hf))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Eagle1Params:
    embed: jax.Array  # [V, D] (the target's when the checkpoint has none)
    fc: jax.Array  # [D, 2D] over [embedding, target hidden]
    layers: list[decoder.DecoderLayer]  # the first one's input_norm is None
    lm_head: jax.Array  # [V, D], the target's


def load_params(tensors: Mapping[str, np.ndarray], cfg: Eagle1Config, dtype) -> Eagle1Params:
    """vLLM-named EAGLE-1 tensors -> host params; the embedding (if the checkpoint has
    none) and the LM head are the target's, filled in by plugin/spec_decode."""
    get = tensor_getter(tensors, dtype)
    D = cfg.hidden_size
    if "fc.bias" in tensors:
        raise ValueError("xla-inference does not serve EAGLE heads whose fc has a bias (vLLM "
                         "loads none)")
    layers = [decoder.DecoderLayer(
        input_norm=None if i == 0 else get(f"layers.{i}.input_layernorm.weight", (D,)),
        attn=decoder.load_attention(get, f"layers.{i}.self_attn.", cfg),
        post_attn_norm=get(f"layers.{i}.post_attention_layernorm.weight", (D,)),
        mlp=decoder.load_gated_mlp(get, f"layers.{i}.mlp.", D, cfg.intermediate_size),
    ) for i in range(cfg.num_layers)]
    embed = get("embed_tokens.weight", (cfg.vocab_size, D)) \
        if "embed_tokens.weight" in tensors else None
    return Eagle1Params(embed=embed, fc=get("fc.weight", (D, 2 * D)), layers=layers,
                        lm_head=None)


def kv_layers(cfg: Eagle1Config) -> list[KvLayer]:
    return [KvLayer(FULL, cfg.num_kv_heads, cfg.head_dim)] * cfg.num_layers


def target_hidden_width(cfg: Eagle1Config) -> int:
    """The head reads the target's final hidden states, the step's first D columns."""
    return cfg.hidden_size


def first_hidden(params: Eagle1Params, target_hidden: jax.Array, cfg: Eagle1Config):
    return target_hidden[:, :cfg.hidden_size].astype(params.fc.dtype)


def forward(params: Eagle1Params, kv_cache, batch: StepBatch, hidden: jax.Array,
            cfg: Eagle1Config):
    """(params, the head's KvCache, batch of the tokens at p + 1, h [T, D] at p) ->
    (cache, x, x): x the residual stream after the head's layers (no final norm)."""
    inv_freq = jnp.asarray(cfg.inv_freq())
    embeds = params.embed[batch.input_ids].astype(hidden.dtype)
    x = project(jnp.concatenate([embeds, hidden], axis=-1), params.fc)
    for i, layer in enumerate(params.layers):
        h = x if layer.input_norm is None else rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
        kv, attn = self_attention(layer.attn, h, kv_cache.layer(i), batch.attention, inv_freq,
                                  head_dim=cfg.head_dim, scale=cfg.head_dim**-0.5,
                                  norm_eps=cfg.rms_norm_eps)
        kv_cache = kv_cache.updated(i, kv)
        x = x + attn
        x = x + gated_mlp(layer.mlp, rms_norm(x, layer.post_attn_norm, cfg.rms_norm_eps))
    return kv_cache, x, x


def draft_tokens(params: Eagle1Params, normed: jax.Array) -> jax.Array:
    """x [B, D] -> the greedy draft [B] int32 under the target's LM head."""
    return jnp.argmax(project(normed, params.lm_head, jnp.float32), axis=-1).astype(jnp.int32)
