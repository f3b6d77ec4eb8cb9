"""The DeepSeek-V3 family (DeepseekV3ForCausalLM: DeepSeek-V3/R1, Kimi-K2).

A pre-norm decoder whose attention is multi-head latent attention (layers/mla.py: the cache
holds one compressed latent and one rope key per token) and whose MLP is dense on the first
`first_k_dense_replace` layers, then a mixture of experts with shared experts and
DeepSeek's grouped sigmoid routing (layers/moe.py, "grouped_sigmoid").

Rope covers only the qk_rope_head_dim dims of q and k. DeepSeek's checkpoints lay them out
as interleaved pairs (rope_interleave, transformers' default); the loader reorders those
weight rows into the rotate-half layout instead (evens, then odds), which is exact: the
rope dims feed nothing but the q . k dot products, and permuting q and k alike leaves those
unchanged. YaRN scaling (the released configs use it) changes the frequencies, scales the
rotated q and k, and multiplies the softmax scale by mscale(factor, mscale_all_dim)^2.

The checkpoint's MTP layers (model.layers.{num_hidden_layers}...) are not part of the
target: the mtp speculative method loads them as a drafter (models/deepseek_mtp.py).
"""

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.kernels.metadata import KvCache
from xla_inference.layers.mla import MlaAttention, cache_width, mla_attention
from xla_inference.layers.mlp import GatedMlp
from xla_inference.layers.moe import MoeConfig, MoeMlp
from xla_inference.layers.norms import rms_norm
from xla_inference.layers.rope import rope_inv_freq, yarn_inv_freq, yarn_mscale
from xla_inference.loading.params import dense, part, take_tensor, tensor_getter
from xla_inference.models.decoder import (DecoderParams, compute_logits, decoder_fields,
                                          load_gated_mlp, load_lm_head, load_moe_mlp, mlp_block,
                                          run_layers, with_hf_defaults)
from xla_inference.models.interface import MLA, KvLayer, ModelFamily, StepBatch

# transformers' DeepseekV3Config defaults for keys that change numerics or shapes (an
# explicit null, as DeepSeek-V2-Lite's q_lora_rank, stays null).
_HF_DEFAULTS = {"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
                "n_shared_experts": 1, "first_k_dense_replace": 3, "q_lora_rank": 1536,
                "rope_theta": 10_000.0, "rms_norm_eps": 1e-6}


@dataclasses.dataclass(frozen=True)
class DeepseekV3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # F of the dense layers' MLP
    num_layers: int
    num_heads: int
    q_lora_rank: int | None  # None: q_proj straight from the hidden state
    kv_lora_rank: int  # L
    qk_nope_head_dim: int  # P
    qk_rope_head_dim: int  # R
    v_head_dim: int  # H
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple | None  # sorted (key, value) pairs, hashable for jit
    rope_interleave: bool
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_dense_layers: int  # the first layers, whose MLP is dense
    moe: MoeConfig
    num_shared_experts: int  # folded into one shared MLP of num_shared * moe width

    @classmethod
    def from_hf(cls, hf: Mapping) -> "DeepseekV3Config":
        hf = with_hf_defaults(hf, _HF_DEFAULTS)
        if hf.get("attention_bias"):
            raise ValueError("DeepSeek-V3 with attention_bias is not supported")
        if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("moe_layer_freq", 1) != 1:
            raise ValueError("DeepSeek-V3 needs scoring_func sigmoid and moe_layer_freq 1, got "
                             f"{hf.get('scoring_func')!r}, {hf.get('moe_layer_freq')!r}")
        common = decoder_fields(hf)
        moe = MoeConfig(num_experts=hf["n_routed_experts"],
                        num_experts_per_tok=hf["num_experts_per_tok"],
                        intermediate_size=hf["moe_intermediate_size"],
                        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                        scoring="grouped_sigmoid", num_groups=hf.get("n_group") or 1,
                        topk_groups=hf.get("topk_group") or 1,
                        routed_scaling_factor=float(hf["routed_scaling_factor"]))
        assert moe.num_experts % moe.num_groups == 0, (moe.num_experts, moe.num_groups)
        keep = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings")
        return cls(**{k: common[k] for k in keep},
                   q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                   qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
                   v_head_dim=hf["v_head_dim"],
                   rope_interleave=bool(hf.get("rope_interleave", True)),
                   max_position_embeddings=hf.get("max_position_embeddings", 4096),
                   num_dense_layers=hf.get("first_k_dense_replace") or 0, moe=moe,
                   num_shared_experts=hf.get("n_shared_experts") or 0)

    def rope(self) -> tuple[np.ndarray, float]:
        """Inverse frequencies [R/2] and the scale of the rotated q and k."""
        scaling = dict(self.rope_scaling or ())
        if scaling.get("rope_type", scaling.get("type")) == "yarn":
            return yarn_inv_freq(self.qk_rope_head_dim, self.rope_theta, scaling,
                                 self.max_position_embeddings)
        return rope_inv_freq(self.qk_rope_head_dim, self.rope_theta, scaling), 1.0

    def softmax_scale(self) -> float:
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        scaling = dict(self.rope_scaling or ())
        if scaling.get("mscale_all_dim"):  # YaRN's correction, as DeepSeek and transformers
            scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
        return scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DeepseekV3Layer:
    input_norm: jax.Array  # [D]
    attn: MlaAttention
    post_attn_norm: jax.Array  # [D]
    mlp: GatedMlp | MoeMlp


def _rope_order(num_dims: int, interleaved: bool) -> np.ndarray:
    """Rotate-half order of the rope dims: interleaved pairs (x0, x1), (x2, x3) .. become
    (evens, odds)."""
    dims = np.arange(num_dims)
    return np.concatenate([dims[0::2], dims[1::2]]) if interleaved else dims


def load_mla(get, prefix: str, cfg: DeepseekV3Config) -> MlaAttention:
    D, N, Q, L = cfg.hidden_size, cfg.num_heads, cfg.q_lora_rank, cfg.kv_lora_rank
    P, R, H = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    rope_order = _rope_order(R, cfg.rope_interleave)
    if Q is None:
        wq_a = q_a_norm = None
        wq = get(prefix + "q_proj.weight", (N * (P + R), D), True)
    else:
        wq_a = get(prefix + "q_a_proj.weight", (Q, D), True)
        q_a_norm = get(prefix + "q_a_layernorm.weight", (Q,))
        wq = get(prefix + "q_b_proj.weight", (N * (P + R), Q), True)
    wq = wq.reshape(wq.shape[0], N, P + R)
    wkv_a = get(prefix + "kv_a_proj_with_mqa.weight", (L + R, D), True)  # [D, L + R]
    wkv_b = dense(get(prefix + "kv_b_proj.weight", (N * (P + H), L)), wkv_a.dtype).reshape(N, P + H, L)
    # The per-head matrices are parts of the checkpoint's: from one not read yet (a
    # multi-host process), placement reads only its devices' heads (params.part).
    return MlaAttention(
        wq_a=wq_a, q_a_norm=q_a_norm, wq_nope=part(wq, (..., slice(0, P))),
        wq_rope=part(wq, (..., P + rope_order)),
        wkv_a=jnp.concatenate([wkv_a[:, :L], wkv_a[:, L + rope_order]], axis=1),
        kv_a_norm=get(prefix + "kv_a_layernorm.weight", (L,)),
        w_uk=part(wkv_b, (slice(None), slice(0, P))),
        w_uv=part(wkv_b, (slice(None), slice(P, P + H))).transpose(0, 2, 1),
        wo=get(prefix + "o_proj.weight", (D, N * H), True).reshape(N, H, D),
    )


def load_moe(tensors: Mapping[str, np.ndarray], get, dtype, prefix: str,
             cfg: DeepseekV3Config) -> MoeMlp:
    """The routed experts (either layout load_moe_mlp reads), the router's score bias (kept
    in float32, as transformers keeps it) and the shared experts."""
    moe = load_moe_mlp(tensors, dtype, prefix, cfg.hidden_size, cfg.moe)
    bias = take_tensor(tensors, prefix + "gate.e_score_correction_bias", (cfg.moe.num_experts,),
                       jnp.float32)
    shared = None
    if cfg.num_shared_experts:
        shared = load_gated_mlp(get, prefix + "shared_experts.", cfg.hidden_size,
                                cfg.moe.intermediate_size * cfg.num_shared_experts)
    return dataclasses.replace(moe, score_bias=bias, shared_expert=shared)


def load_params(tensors: Mapping[str, np.ndarray], cfg: DeepseekV3Config, dtype) -> DecoderParams:
    """HF-named tensors ([out, in] linear weights) -> params in `dtype`."""
    get = tensor_getter(tensors, dtype)

    D, V = cfg.hidden_size, cfg.vocab_size

    def layer(i: int) -> DeepseekV3Layer:
        prefix = f"model.layers.{i}."
        mlp = (load_gated_mlp(get, prefix + "mlp.", D, cfg.intermediate_size)
               if i < cfg.num_dense_layers else load_moe(tensors, get, dtype, prefix + "mlp.", cfg))
        return DeepseekV3Layer(input_norm=get(prefix + "input_layernorm.weight", (D,)),
                               attn=load_mla(get, prefix + "self_attn.", cfg),
                               post_attn_norm=get(prefix + "post_attention_layernorm.weight", (D,)),
                               mlp=mlp)

    embed = get("model.embed_tokens.weight", (V, D))
    return DecoderParams(embed=embed, layers=[layer(i) for i in range(cfg.num_layers)],
                         final_norm=get("model.norm.weight", (D,)),
                         lm_head=load_lm_head(get, embed, cfg.tie_word_embeddings))


@functools.partial(jax.jit, static_argnames=("cfg", "rope_scale"))  # see decoder._layer
def _layer(layer: DeepseekV3Layer, x, kv, batch: StepBatch, cfg: DeepseekV3Config, inv_freq,
           rope_scale: float):
    h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
    kv, attn = mla_attention(layer.attn, h, kv, batch.attention, inv_freq, scale=cfg.softmax_scale(),
                             rope_scale=rope_scale)
    x = x + attn
    h = rms_norm(x, layer.post_attn_norm, cfg.rms_norm_eps)
    return kv, x + mlp_block(layer.mlp, h, cfg, batch.attention.real_tokens())


def forward(params: DecoderParams, kv_cache: KvCache, batch: StepBatch, cfg: DeepseekV3Config):
    """(params, kv_cache, batch) -> (kv_cache, hidden [T, D]) after the final norm."""
    inv_freq, rope_scale = cfg.rope()
    inv_freq = jnp.asarray(inv_freq)
    step = lambda layer, x, kv: _layer(layer, x, kv, batch, cfg, inv_freq, rope_scale)  # noqa: E731
    kv_cache, x = run_layers(step, params.layers, kv_cache, params.embed[batch.input_ids])
    return kv_cache, rms_norm(x, params.final_norm, cfg.rms_norm_eps)


def kv_layers(cfg: DeepseekV3Config) -> list[KvLayer]:
    """One latent [latent, k_rope] per token and layer (layers/mla.py)."""
    width = cache_width(cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    return [KvLayer(MLA, 1, width)] * cfg.num_layers


FAMILY = ModelFamily(name="deepseek_v3", architectures=("DeepseekV3ForCausalLM",),
                     config_from_hf=DeepseekV3Config.from_hf, load_params=load_params,
                     forward=forward, compute_logits=compute_logits, kv_layers=kv_layers)
