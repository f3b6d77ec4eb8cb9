"""The Llama family (Llama 2/3/3.1/3.2, SmolLM2, TinyLlama) as a pure JAX function."""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.layers.attention import paged_attention
from xla_inference.layers.norms import rms_norm
from xla_inference.layers.rope import apply_rope, rope_inv_freq
from xla_inference.loading.params import take_tensor
from xla_inference.runner.batch import StepBatch

KVCache = list[tuple[jax.Array, jax.Array]]  # per layer: k, v [num_slots, K, H]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple | None  # sorted (key, value) pairs, hashable for jit
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, hf: Mapping) -> "LlamaConfig":
        num_heads = hf["num_attention_heads"]
        scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
        if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )

    def inv_freq(self) -> np.ndarray:
        return rope_inv_freq(self.head_dim, self.rope_theta, dict(self.rope_scaling or ()))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LlamaLayer:
    input_norm: jax.Array  # [D]
    wq: jax.Array  # [D, N*H]
    wk: jax.Array  # [D, K*H]
    wv: jax.Array  # [D, K*H]
    wo: jax.Array  # [N*H, D]
    post_attn_norm: jax.Array  # [D]
    w_gate: jax.Array  # [D, F]
    w_up: jax.Array  # [D, F]
    w_down: jax.Array  # [F, D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LlamaParams:
    embed: jax.Array  # [V, D]
    layers: list[LlamaLayer]
    final_norm: jax.Array  # [D]
    lm_head: jax.Array  # [D, V] (the transposed embedding when tied)


def load_params(tensors: Mapping[str, np.ndarray], cfg: LlamaConfig, dtype) -> LlamaParams:
    """HF-named tensors ([out, in] linear weights) -> params in `dtype`, [in, out] layout."""
    get = lambda name, shape, t=False: take_tensor(tensors, name, shape, dtype, transpose=t)  # noqa: E731
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    NH, KH = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layers.append(LlamaLayer(
            input_norm=get(p + "input_layernorm.weight", (D,)),
            wq=get(p + "self_attn.q_proj.weight", (NH, D), True),
            wk=get(p + "self_attn.k_proj.weight", (KH, D), True),
            wv=get(p + "self_attn.v_proj.weight", (KH, D), True),
            wo=get(p + "self_attn.o_proj.weight", (D, NH), True),
            post_attn_norm=get(p + "post_attention_layernorm.weight", (D,)),
            w_gate=get(p + "mlp.gate_proj.weight", (F, D), True),
            w_up=get(p + "mlp.up_proj.weight", (F, D), True),
            w_down=get(p + "mlp.down_proj.weight", (D, F), True),
        ))
    embed = get("model.embed_tokens.weight", (V, D))
    head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    return LlamaParams(
        embed=embed,
        layers=layers,
        final_norm=get("model.norm.weight", (D,)),
        lm_head=get(head_name, (V, D), True),
    )


def _attention_block(layer: LlamaLayer, x, kv, batch: StepBatch, cfg: LlamaConfig, inv_freq):
    T = x.shape[0]
    h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
    q = (h @ layer.wq).reshape(T, cfg.num_heads, cfg.head_dim)
    k = (h @ layer.wk).reshape(T, cfg.num_kv_heads, cfg.head_dim)
    v = (h @ layer.wv).reshape(T, cfg.num_kv_heads, cfg.head_dim)
    q = apply_rope(q, batch.positions, inv_freq)
    k = apply_rope(k, batch.positions, inv_freq)
    kv, out = paged_attention(q, k, v, kv, batch, scale=cfg.head_dim**-0.5)
    return kv, out.reshape(T, -1) @ layer.wo


def _mlp_block(layer: LlamaLayer, x, cfg: LlamaConfig):
    h = rms_norm(x, layer.post_attn_norm, cfg.rms_norm_eps)
    return (jax.nn.silu(h @ layer.w_gate) * (h @ layer.w_up)) @ layer.w_down


def forward(params: LlamaParams, kv_cache: KVCache, batch: StepBatch, cfg: LlamaConfig):
    """(params, kv_cache, batch) -> (kv_cache, hidden [T, D]) after the final norm."""
    inv_freq = jnp.asarray(cfg.inv_freq())
    x = params.embed[batch.input_ids]
    new_cache = []
    # A Python loop (unrolled) rather than lax.scan: scanning would carry the whole KV
    # cache through the loop and copy it every step (see DESIGN.md).
    for layer, kv in zip(params.layers, kv_cache):
        kv, attn = _attention_block(layer, x, kv, batch, cfg, inv_freq)
        x = x + attn
        x = x + _mlp_block(layer, x, cfg)
        new_cache.append(kv)
    return new_cache, rms_norm(x, params.final_norm, cfg.rms_norm_eps)


def compute_logits(params: LlamaParams, hidden: jax.Array) -> jax.Array:
    """hidden [B, D] -> logits [B, V] in float32."""
    return jnp.einsum("BD,DV->BV", hidden, params.lm_head, preferred_element_type=jnp.float32)


def kv_cache_shape(cfg: LlamaConfig, num_slots: int) -> list[tuple[int, ...]]:
    """Shape of each layer's K (and V) cache array."""
    return [(num_slots, cfg.num_kv_heads, cfg.head_dim)] * cfg.num_layers

Config = LlamaConfig
