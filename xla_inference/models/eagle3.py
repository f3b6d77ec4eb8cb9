"""The EAGLE-3 draft head for Llama-family targets (vLLM's `eagle3` speculative method,
checkpoints of the `LlamaForCausalLMEagle3` kind), and the target forward that hands it
the auxiliary hidden states it reads.

The head, at a position p of a request: the target's residual stream entering three of its
layers (the "aux" layers) at p, concatenated and projected by `fc` to one hidden state h;
the embedding e of the token at p + 1; one decoder layer whose attention reads
[norm(e), norm(h)] (2D wide) with h as the residual; a final norm; its own LM head over a
draft vocabulary, each draft id d standing for target id d + d2t[d]. Drafting past the
target's tokens feeds the layer's output before the final norm back as h.

The aux layers: the draft config's `eagle_aux_hidden_state_layer_ids` (at the top level or
in `eagle_config`), else (2, L // 2, L - 3) of a target with L layers; id i is the residual
stream after i layers (0: the embeddings), and they are concatenated in ascending order.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.layers.attention import SelfAttention, self_attention
from xla_inference.layers.linear import project
from xla_inference.layers.mlp import GatedMlp, gated_mlp
from xla_inference.layers.norms import rms_norm
from xla_inference.layers.rope import rope_inv_freq
from xla_inference.loading.params import tensor_getter
from xla_inference.lora.slots import embed_lookup
from xla_inference.models import decoder
from xla_inference.models.interface import FULL, KvLayer, ModelFamily, StepBatch

ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int
    target_hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple | None
    vocab_size: int  # the target's: the head embeds target ids
    draft_vocab_size: int  # rows of the head's own LM head
    aux_layer_ids: tuple[int, ...]  # the target layers read, ascending
    norm_before_residual: bool = False  # the residual is norm(h) rather than h
    qkv_bias: bool = False

    @property
    def num_aux(self) -> int:
        return len(self.aux_layer_ids)

    def inv_freq(self) -> np.ndarray:
        return rope_inv_freq(self.head_dim, self.rope_theta, dict(self.rope_scaling or ()))

    @classmethod
    def from_hf(cls, hf: Mapping, target_num_layers: int) -> Eagle3Config:
        _refuse_unserved(hf)
        fields = decoder.decoder_fields(hf)
        return cls(
            hidden_size=fields["hidden_size"],
            target_hidden_size=int(hf.get("target_hidden_size") or fields["hidden_size"]),
            intermediate_size=fields["intermediate_size"],
            num_heads=fields["num_heads"], num_kv_heads=fields["num_kv_heads"],
            head_dim=fields["head_dim"], rms_norm_eps=fields["rms_norm_eps"],
            rope_theta=fields["rope_theta"], rope_scaling=fields["rope_scaling"],
            vocab_size=fields["vocab_size"],
            draft_vocab_size=int(hf.get("draft_vocab_size") or fields["vocab_size"]),
            aux_layer_ids=aux_layer_ids(hf, target_num_layers),
            norm_before_residual=bool(hf.get("norm_before_residual", False)),
            qkv_bias=bool(hf.get("attention_bias", False)),
        )


def aux_layer_ids(hf: Mapping, target_num_layers: int) -> tuple[int, ...]:
    """The target layers whose input the head reads (vLLM's rule, module docstring)."""
    ids = hf.get("eagle_aux_hidden_state_layer_ids") or \
        (hf.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if not ids:
        L = target_num_layers
        ids = (2, L // 2, L - 3)
    ids = tuple(sorted({int(i) for i in ids}))
    if ids[0] < 0 or ids[-1] > target_num_layers:
        raise ValueError(f"EAGLE-3 aux hidden state layers {ids} are outside the target's "
                         f"{target_num_layers} layers")
    return ids


def _refuse_unserved(hf: Mapping) -> None:
    """Variants of the EAGLE-3 Llama head this implementation does not compute, by name."""
    eagle = hf.get("eagle_config") or {}
    refusals = [
        (hf.get("num_hidden_layers", 1) != 1,
         f"{hf.get('num_hidden_layers')} decoder layers (served: 1)"),
        (not eagle.get("use_aux_hidden_state", True), "use_aux_hidden_state false"),
        (bool(eagle.get("norm_before_fc", hf.get("norm_before_fc", False))), "norm_before_fc"),
        (bool(hf.get("fc_norm", False)), "fc_norm"),
        (bool(hf.get("norm_output", False)), "norm_output"),
        (float(hf.get("logit_scale", 1.0)) != 1.0, "logit_scale"),
        (bool(hf.get("mlp_bias", False)), "mlp_bias"),
    ]
    for refused, what in refusals:
        if refused:
            raise ValueError(f"xla-inference does not serve EAGLE-3 heads with {what} yet")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Eagle3Params:
    embed: jax.Array  # [V, D] (the target's when the checkpoint has none)
    fc: jax.Array  # [D, num_aux * Dt]
    input_norm: jax.Array  # [D], over the token's embedding
    hidden_norm: jax.Array  # [D], over h
    attn: SelfAttention  # q/k/v [*, 2D]
    post_attn_norm: jax.Array  # [D]
    mlp: GatedMlp
    final_norm: jax.Array  # [D]
    lm_head: jax.Array  # [Vd, D]
    draft_to_target: jax.Array  # [Vd] int32: the target id of each draft id


def _layer_prefix(tensors: Mapping) -> str:
    """EAGLE-3 checkpoints name the layer `midlayer.` (vLLM also reads `layers.0.`),
    with or without a `model.` prefix."""
    for prefix in ("midlayer.", "layers.0.", "model.midlayer.", "model.layers.0."):
        if prefix + "input_layernorm.weight" in tensors:
            return prefix
    raise ValueError("the EAGLE-3 checkpoint has no decoder layer (midlayer.* or layers.0.*)")


def _first_present(tensors: Mapping, *names: str) -> str | None:
    return next((n for n in names if n in tensors), None)


def load_params(tensors: Mapping[str, np.ndarray], cfg: Eagle3Config, dtype,
                target_embed=None) -> Eagle3Params:
    """vLLM-named EAGLE-3 tensors -> host params; target_embed: the target's embedding
    [V, D], used where the checkpoint has none (as vLLM shares it); None: filled later."""
    get = tensor_getter(tensors, dtype)
    D, Dt, V, Vd = cfg.hidden_size, cfg.target_hidden_size, cfg.vocab_size, cfg.draft_vocab_size
    NH, KH = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    p = _layer_prefix(tensors)
    bias = lambda proj, n: get(f"{p}self_attn.{proj}.bias", (n,)) if cfg.qkv_bias else None  # noqa: E731
    attn = SelfAttention(
        wq=get(p + "self_attn.q_proj.weight", (NH, 2 * D)),
        wk=get(p + "self_attn.k_proj.weight", (KH, 2 * D)),
        wv=get(p + "self_attn.v_proj.weight", (KH, 2 * D)),
        wo=get(p + "self_attn.o_proj.weight", (D, NH)),
        bq=bias("q_proj", NH), bk=bias("k_proj", KH), bv=bias("v_proj", KH))
    embed_name = _first_present(tensors, "embed_tokens.weight", "model.embed_tokens.weight")
    if embed_name is not None:
        embed = get(embed_name, (V, D))
    else:  # None until the target's is known (plugin/spec_decode.build_eagle_proposer)
        embed = target_embed
    d2t_name = _first_present(tensors, "d2t", "model.d2t")
    if Vd != V and d2t_name is None:
        raise ValueError(f"the EAGLE-3 head's draft vocabulary ({Vd}) differs from the "
                         f"target's ({V}) but the checkpoint has no d2t map")
    offsets = np.zeros(Vd, np.int64) if d2t_name is None else np.asarray(tensors[d2t_name])
    if offsets.shape != (Vd,):
        raise ValueError(f"d2t has shape {offsets.shape}; expected ({Vd},)")
    draft_to_target = np.arange(Vd, dtype=np.int64) + offsets.astype(np.int64)
    if draft_to_target.min() < 0 or draft_to_target.max() >= V:
        raise ValueError("d2t maps draft ids outside the target's vocabulary")
    return Eagle3Params(
        embed=embed,
        fc=get(_first_present(tensors, "fc.weight", "model.fc.weight") or "fc.weight",
               (D, cfg.num_aux * Dt)),
        input_norm=get(p + "input_layernorm.weight", (D,)),
        hidden_norm=get(p + "hidden_norm.weight", (D,)),
        attn=attn,
        post_attn_norm=get(p + "post_attention_layernorm.weight", (D,)),
        mlp=decoder.load_gated_mlp(get, p + "mlp.", D, cfg.intermediate_size),
        final_norm=get(_first_present(tensors, "norm.weight", "model.norm.weight")
                       or "norm.weight", (D,)),
        lm_head=get("lm_head.weight", (Vd, D)),
        draft_to_target=draft_to_target.astype(np.int32),
    )


def kv_layers(cfg: Eagle3Config) -> list[KvLayer]:
    """The head's one attention layer keeps its own K and V per position."""
    return [KvLayer(FULL, cfg.num_kv_heads, cfg.head_dim)]


def combine_aux(params: Eagle3Params, aux: jax.Array) -> jax.Array:
    """aux [T, num_aux * Dt] (the aux states side by side) -> h [T, D]."""
    return project(aux, params.fc)


def head_forward(params: Eagle3Params, kv, batch: StepBatch, hidden: jax.Array,
                 cfg: Eagle3Config):
    """(params, the layer's cache, batch of the tokens at p + 1, h [T, D] at p) ->
    (cache, normed [T, D] for the LM head, pre-norm [T, D] to feed back as h)."""
    embeds = params.embed[batch.input_ids].astype(hidden.dtype)
    normed_hidden = rms_norm(hidden, params.hidden_norm, cfg.rms_norm_eps)
    residual = normed_hidden if cfg.norm_before_residual else hidden
    x = jnp.concatenate([rms_norm(embeds, params.input_norm, cfg.rms_norm_eps), normed_hidden],
                        axis=-1)
    kv, attn = self_attention(params.attn, x, kv, batch.attention, jnp.asarray(cfg.inv_freq()),
                              head_dim=cfg.head_dim, scale=cfg.head_dim**-0.5,
                              norm_eps=cfg.rms_norm_eps)
    residual = residual + attn
    out = gated_mlp(params.mlp, rms_norm(residual, params.post_attn_norm, cfg.rms_norm_eps))
    prenorm = residual + out
    return kv, rms_norm(prenorm, params.final_norm, cfg.rms_norm_eps), prenorm


def first_hidden(params: Eagle3Params, target_hidden: jax.Array, cfg: Eagle3Config):
    """A target step's hidden rows [T, Dt * (1 + num_aux)] -> the head's h [T, D]."""
    width = cfg.target_hidden_size
    aux = target_hidden[:, width:width * (1 + cfg.num_aux)]
    return combine_aux(params, aux.astype(params.fc.dtype))


def forward(params: Eagle3Params, kv_cache, batch: StepBatch, hidden: jax.Array,
            cfg: Eagle3Config):
    """head_forward over the head's KvCache (its one layer): (cache, normed, pre-norm)."""
    layer, normed, prenorm = head_forward(params, kv_cache.layer(0), batch, hidden, cfg)
    return kv_cache.updated(0, layer), normed, prenorm


def target_hidden_width(cfg: Eagle3Config) -> int:
    """Columns of the target step's hidden states the head reads from."""
    return cfg.target_hidden_size * (1 + cfg.num_aux)


def draft_tokens(params: Eagle3Params, normed: jax.Array) -> jax.Array:
    """normed [B, D] -> the greedy draft [B] int32, as target ids."""
    logits = project(normed, params.lm_head, jnp.float32)
    return params.draft_to_target[jnp.argmax(logits, axis=-1)]


# -- the target's side --------------------------------------------------------------------

def _aux_forward(layer_ids: tuple[int, ...], params, kv_cache, batch: StepBatch, cfg):
    """decoder.forward that also returns the residual stream entering each aux layer:
    hidden [T, D * (1 + num_aux)], the final (normed) hidden states first."""
    if batch.input_ids.ndim != 1:
        raise NotImplementedError("EAGLE-3 with pipeline micro-batches")
    inv_freq = jnp.asarray(cfg.inv_freq())
    x = embed_lookup(params.embed, batch.input_ids)  # with LoRA: the adapted embedding
    aux = []
    for i, layer in enumerate(params.layers):
        if i in layer_ids:
            aux.append(x)
        kv, x = decoder._layer(layer, x, kv_cache.layer(i), batch, cfg, inv_freq,
                               cfg.sliding_window(i))
        kv_cache = kv_cache.updated(i, kv)
    if cfg.num_layers in layer_ids:
        aux.append(x)
    final = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    return kv_cache, jnp.concatenate([final, *(a.astype(final.dtype) for a in aux)], axis=-1)


def _first_hidden_logits(compute_logits, width: int, params, hidden, cfg=None):
    return compute_logits(params, hidden[..., :width], cfg)


def with_aux_hidden_states(family: ModelFamily, cfg, layer_ids: tuple[int, ...]) -> ModelFamily:
    """The target family whose forward's hidden states carry the aux states after the
    final ones ([T, D * (1 + len(layer_ids))]); its logits read the first D columns, so
    the engine's logits, verify and scoring programs are unchanged."""
    if family.forward is not decoder.forward:
        raise ValueError(f"xla-inference serves EAGLE-3 for targets of the dense decoder "
                         f"families (llama, qwen2, qwen3, mistral), not {family.name}")
    if getattr(cfg, "moe", None) is not None:
        raise ValueError("xla-inference does not serve EAGLE-3 for MoE targets yet")
    return dataclasses.replace(
        family,
        forward=functools.partial(_aux_forward, tuple(layer_ids)),
        compute_logits=functools.partial(_first_hidden_logits, family.compute_logits,
                                         cfg.hidden_size))


def returns_aux_hidden_states(family: ModelFamily) -> bool:
    """Whether `family` is a with_aux_hidden_states target."""
    forward = family.forward
    return isinstance(forward, functools.partial) and forward.func is _aux_forward
