"""DeepSeek-V3's multi-token prediction (MTP) layer as a drafter (vLLM's `mtp` speculative
method, its `deepseek_mtp` alias): the checkpoint's extra layer `model.layers.{L}` (L the
target's num_hidden_layers) run by spec_decode/eagle.EagleProposer like an EAGLE head.

At a position p: the target's final (normed) hidden state h at p and the embedding e of the
token at p + 1 (zero at position 0, as vLLM masks it), x = eh_proj([enorm(e), hnorm(h)])
(2D -> D, no bias); one DeepSeek-V3 decoder block (MLA, then MoE or dense MLP as its index
makes it); shared_head.norm gives y, whose logits under the LM head draft the token at
p + 2. Drafting on, y itself is fed back as h (vLLM recycles the normed state for the
DeepSeek MTP). As vLLM 0.32 does, the embedding and the LM head are the target's: DeepSeek's
checkpoints carry copies under the MTP layer (embed_tokens, shared_head.head), not read here.
The one layer serves every draft (k >= 1), as vLLM re-uses it; checkpoints with several MTP
layers (num_nextn_predict_layers > 1) are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.layers.linear import project
from xla_inference.layers.norms import rms_norm
from xla_inference.loading.params import tensor_getter
from xla_inference.models import deepseek_v3
from xla_inference.models.interface import StepBatch

ARCHITECTURES = ("DeepseekV3ForCausalLM",)
# spec_decode/eagle.EagleProposer splits the layer over the tensor-parallel axis as the target's
# layers are split (the logical axes its params declare), rather than replicating it.
SHARDED_AS_TARGET = True


@dataclasses.dataclass(frozen=True)
class MtpConfig(deepseek_v3.DeepseekV3Config):
    """The target's config (the MTP block has the target's shapes) and its MTP layer count."""

    num_nextn_predict_layers: int = 1

    @property
    def mtp_layer(self) -> int:
        """The checkpoint index of the (first) MTP layer."""
        return self.num_layers

    @classmethod
    def from_hf(cls, hf: Mapping) -> MtpConfig:
        refuse_unserved(hf)
        target = deepseek_v3.DeepseekV3Config.from_hf(hf)
        fields = {f.name: getattr(target, f.name) for f in dataclasses.fields(target)}
        return cls(**fields, num_nextn_predict_layers=int(hf["num_nextn_predict_layers"]))


def refuse_unserved(hf: Mapping) -> None:
    """A target whose checkpoint this drafter cannot serve, by name."""
    archs = list(hf.get("architectures") or [])
    if not set(archs) & set(ARCHITECTURES):
        raise ValueError(f"xla-inference serves the mtp speculative method for DeepSeek-V3 "
                         f"targets ({', '.join(ARCHITECTURES)}), not {archs}")
    n = int(hf.get("num_nextn_predict_layers") or 0)
    if n < 1:
        raise ValueError("the mtp speculative method needs a checkpoint with MTP layers; this "
                         "config has num_nextn_predict_layers "
                         f"{hf.get('num_nextn_predict_layers')!r}")
    if n > 1:
        raise ValueError(f"xla-inference serves checkpoints with one MTP layer "
                         f"(num_nextn_predict_layers 1), not {n}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MtpParams:
    embed: jax.Array  # [V, D], the target's (filled in by plugin/spec_decode)
    fc: jax.Array  # [D, 2D]: eh_proj over [enorm(embedding), hnorm(hidden)]
    enorm: jax.Array  # [D]
    hnorm: jax.Array  # [D]
    block: deepseek_v3.DeepseekV3Layer
    head_norm: jax.Array  # [D], shared_head.norm
    lm_head: jax.Array  # [V, D], the target's (filled in by plugin/spec_decode)


def load_params(tensors: Mapping[str, np.ndarray], cfg: MtpConfig, dtype) -> MtpParams:
    """The MTP layer's tensors (`model.layers.{L}.*`) -> host params; embed and lm_head are
    None until the target's are known."""
    prefix = f"model.layers.{cfg.mtp_layer}."
    if prefix + "eh_proj.weight" not in tensors:
        raise ValueError(f"the checkpoint has no MTP layer weights ({prefix}eh_proj.weight "
                         "missing): the mtp speculative method needs a checkpoint that keeps "
                         "its MTP layers")
    get = tensor_getter(tensors, dtype)
    D = cfg.hidden_size
    is_dense = cfg.mtp_layer < cfg.num_dense_layers
    mlp = (deepseek_v3.load_gated_mlp(get, prefix + "mlp.", D, cfg.intermediate_size) if is_dense
           else deepseek_v3.load_moe(tensors, get, dtype, prefix + "mlp.", cfg))
    block = deepseek_v3.DeepseekV3Layer(
        input_norm=get(prefix + "input_layernorm.weight", (D,)),
        attn=deepseek_v3.load_mla(get, prefix + "self_attn.", cfg),
        post_attn_norm=get(prefix + "post_attention_layernorm.weight", (D,)), mlp=mlp)
    return MtpParams(embed=None, fc=get(prefix + "eh_proj.weight", (D, 2 * D)),
                     enorm=get(prefix + "enorm.weight", (D,)),
                     hnorm=get(prefix + "hnorm.weight", (D,)), block=block,
                     head_norm=get(prefix + "shared_head.norm.weight", (D,)), lm_head=None)


def kv_layers(cfg: MtpConfig):
    """The block's one latent cache layer, as the target's."""
    return deepseek_v3.kv_layers(cfg)[:1]


def target_hidden_width(cfg: MtpConfig) -> int:
    """The layer reads the target's final hidden states, the step's first D columns."""
    return cfg.hidden_size


def first_hidden(params: MtpParams, target_hidden: jax.Array, cfg: MtpConfig):
    return target_hidden[:, :cfg.hidden_size].astype(params.fc.dtype)


def forward(params: MtpParams, kv_cache, batch: StepBatch, hidden: jax.Array, cfg: MtpConfig):
    """(params, the layer's KvCache, batch of the tokens at p + 1, h [T, D] at p) ->
    (cache, y, y): y = shared_head.norm of the block's output, for the LM head and fed back."""
    positions = batch.attention.positions
    embeds = params.embed[batch.input_ids].astype(hidden.dtype)
    embeds = jnp.where((positions == 0)[:, None], jnp.zeros_like(embeds), embeds)
    x = project(jnp.concatenate([rms_norm(embeds, params.enorm, cfg.rms_norm_eps),
                                 rms_norm(hidden, params.hnorm, cfg.rms_norm_eps)], axis=-1),
                params.fc)
    inv_freq, rope_scale = cfg.rope()
    kv, x = deepseek_v3._layer(params.block, x, kv_cache.layer(0), batch, cfg,
                               jnp.asarray(inv_freq), rope_scale)
    y = rms_norm(x, params.head_norm, cfg.rms_norm_eps)
    return kv_cache.updated(0, kv), y, y


def logits(params: MtpParams, y: jax.Array) -> jax.Array:
    """y [T, D] -> float32 logits [T, V] under the target's LM head."""
    return project(y, params.lm_head, jnp.float32)


def draft_tokens(params: MtpParams, y: jax.Array) -> jax.Array:
    """y [B, D] -> the greedy draft [B] int32."""
    return jnp.argmax(logits(params, y), axis=-1).astype(jnp.int32)
