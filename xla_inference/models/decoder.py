"""The pre-norm decoder shared by the Llama, Qwen2, Qwen3, Mistral, Qwen3-MoE and Mixtral
families.

Each layer: x += attention(rms_norm(x)); x += mlp(rms_norm(x)), where the MLP is a gated
MLP or, in a MoE layer, a mixture of experts. The families differ only in what their
configs switch on: q/k/v (and o) biases, per-head q/k norms, sliding windows per layer,
which layers have experts. Each family file turns its HF config into a DecoderConfig (one
`from_hf`) and exposes this module's functions as its own.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.kernels.metadata import KvCache
from xla_inference.layers.attention import SelfAttention, self_attention
from xla_inference.layers.linear import project
from xla_inference.layers.mlp import GatedMlp, gated_mlp
from xla_inference.layers.moe import MoeConfig, MoeMlp, moe_mlp
from xla_inference.layers.norms import DeferredRmsNorm, materialized, rms_norm
from xla_inference.lora.slots import embed_lookup
from xla_inference.layers.rope import rope_inv_freq
from xla_inference.loading.params import part, take_stacked, take_tensor, tensor_getter
from xla_inference.parallel.axes import weight
from xla_inference.parallel.pipeline import run_microbatched
from xla_inference.models.interface import FULL, SLIDING, KvLayer, ModelFamily, StepBatch



@dataclasses.dataclass(frozen=True)
class DecoderConfig:
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
    qkv_bias: bool = False  # q, k and v projections have biases
    o_bias: bool = False  # the output projection has a bias
    qk_norm: bool = False  # RMSNorm over each head of q and k before rope
    sliding_windows: tuple[int | None, ...] | None = None  # per layer; None: all full attention
    moe: MoeConfig | None = None  # the experts of the MoE layers; None: no MoE layers

    def inv_freq(self) -> np.ndarray:
        return rope_inv_freq(self.head_dim, self.rope_theta, dict(self.rope_scaling or ()))

    def sliding_window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None


# What each family's MLP computes: SiLU-gated (layers/mlp.gated_mlp); Gemma's its own.
SILU_ACTIVATIONS = ("silu", "swish")


def refuse_other_activation(hf: Mapping, served: tuple[str, ...] = SILU_ACTIVATIONS,
                            key: str = "hidden_act") -> None:
    """A config.json whose MLP activation (`key`) is not the one the family computes would
    be served with the wrong MLP: refused, naming it."""
    found = hf.get(key, served[0])
    if found not in served:
        raise ValueError(f"xla-inference serves {hf.get('model_type', 'this family')} with "
                         f"{key} {' or '.join(served)}, not {found!r}")


def with_hf_defaults(hf: Mapping, defaults: Mapping) -> dict:
    """A config.json with transformers' config-class defaults where it leaves keys out
    (what transformers and vLLM then read): only absent keys are filled; an explicit null
    stays null."""
    return {**defaults, **hf}


def decoder_fields(hf: Mapping, activations: tuple[str, ...] = SILU_ACTIVATIONS,
                   activation_key: str = "hidden_act") -> dict:
    """The DecoderConfig fields every family reads the same way from a HF config.json; an
    MLP activation other than `activations` (under `activation_key`) is refused."""
    refuse_other_activation(hf, activations, activation_key)
    num_heads = hf["num_attention_heads"]
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    # transformers turns only that share of a head under a scaled rope (linear, llama3, yarn;
    # its Llama-like default rope ignores the key); ours turns whole heads.
    partial = (scaling or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if scaling and float(partial or 1.0) != 1.0:
        raise ValueError(f"xla-inference does not serve partial_rotary_factor {partial} with "
                         f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r}")
    # transformers 5 keeps the base in rope_parameters; older configs at the top level. A
    # family's transformers defaults (with_hf_defaults) fill in a top-level one.
    theta = (hf.get("rope_parameters") or {}).get("rope_theta") or hf.get("rope_theta", 10000.0)
    return dict(
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecoderLayer:
    input_norm: jax.Array  # [D]
    attn: SelfAttention
    post_attn_norm: jax.Array  # [D]
    mlp: GatedMlp | MoeMlp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecoderParams:
    embed: jax.Array = weight("vocab", "embed")  # [V, D]
    layers: list[DecoderLayer] = weight()
    final_norm: jax.Array = weight()  # [D]
    # [V, D]: the embedding's host array when tied; multiplied by linear.project
    lm_head: jax.Array = weight("vocab", "embed", projection=True)


def load_attention(get, prefix: str, cfg: DecoderConfig) -> SelfAttention:
    """`prefix` + q/k/v/o_proj (HF [out, in] weights) and the optional biases and q/k norms."""
    D, H = cfg.hidden_size, cfg.head_dim
    NH, KH = cfg.num_heads * H, cfg.num_kv_heads * H
    bias = lambda proj, n: get(f"{prefix}{proj}.bias", (n,)) if cfg.qkv_bias else None  # noqa: E731
    return SelfAttention(
        wq=get(prefix + "q_proj.weight", (NH, D)),
        wk=get(prefix + "k_proj.weight", (KH, D)),
        wv=get(prefix + "v_proj.weight", (KH, D)),
        wo=get(prefix + "o_proj.weight", (D, NH)),
        bq=bias("q_proj", NH), bk=bias("k_proj", KH), bv=bias("v_proj", KH),
        bo=get(prefix + "o_proj.bias", (D,)) if cfg.o_bias else None,
        q_norm=get(prefix + "q_norm.weight", (H,)) if cfg.qk_norm else None,
        k_norm=get(prefix + "k_norm.weight", (H,)) if cfg.qk_norm else None,
    )


def load_gated_mlp(get, prefix: str, hidden_size: int, intermediate_size: int) -> GatedMlp:
    D, F = hidden_size, intermediate_size
    return GatedMlp(w_gate=get(prefix + "gate_proj.weight", (F, D)),
                    w_up=get(prefix + "up_proj.weight", (F, D)),
                    w_down=get(prefix + "down_proj.weight", (D, F)))


def load_moe_mlp(tensors: Mapping[str, np.ndarray], dtype, prefix: str, hidden_size: int,
                 moe: MoeConfig, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
                 ) -> MoeMlp:
    """`prefix` + the router `gate.weight` [E, D] and the experts, in either layout:
    per expert, `experts.{i}.{gate, up, down name}.weight` (HF [out, in]; what checkpoints
    and save_pretrained hold), or fused, `experts.gate_up_proj` [E, 2F, D] and
    `experts.down_proj` [E, D, F] (transformers >= 5's in-memory layout)."""
    D, E, F = hidden_size, moe.num_experts, moe.intermediate_size

    def get(name, shape):  # [.., out, in] -> [.., in, out]
        return take_tensor(tensors, prefix + name, shape, dtype, transpose=True)

    def stack(name, shape):  # each expert's [out, in] -> [E, in, out]
        per_expert = [f"{prefix}experts.{e}.{name}.weight" for e in range(E)]
        return take_stacked(tensors, per_expert, shape, dtype, transpose=True)

    router = get("gate.weight", (E, D))
    if prefix + "experts.gate_up_proj" in tensors:
        gate_up = get("experts.gate_up_proj", (E, 2 * F, D))  # [E, D, 2F]: gate, then up
        return MoeMlp(router=router, w_gate=part(gate_up, (..., slice(0, F))),
                      w_up=part(gate_up, (..., slice(F, 2 * F))),
                      w_down=get("experts.down_proj", (E, D, F)))
    gate, up, down = names
    return MoeMlp(router=router, w_gate=stack(gate, (F, D)), w_up=stack(up, (F, D)),
                  w_down=stack(down, (D, F)))


# (get, layer index) -> that layer's MLP params; get(name, shape, transpose) as load_attention's
MlpLoader = Callable[[Callable, int], GatedMlp | MoeMlp]


def load_params(tensors: Mapping[str, np.ndarray], cfg: DecoderConfig, dtype,
                load_mlp: MlpLoader | None = None) -> DecoderParams:
    """HF-named tensors -> params in `dtype`, linear weights kept [out, in] (linear.py).
    `load_mlp` loads a layer's MLP where a family's differ (MoE); by default the gated MLP
    at `model.layers.{i}.mlp.`."""
    get = tensor_getter(tensors, dtype)
    D, V = cfg.hidden_size, cfg.vocab_size
    load_mlp = load_mlp or (
        lambda get, i: load_gated_mlp(get, f"model.layers.{i}.mlp.", D, cfg.intermediate_size))
    layers = [DecoderLayer(
        input_norm=get(f"model.layers.{i}.input_layernorm.weight", (D,)),
        attn=load_attention(get, f"model.layers.{i}.self_attn.", cfg),
        post_attn_norm=get(f"model.layers.{i}.post_attention_layernorm.weight", (D,)),
        mlp=load_mlp(get, i),
    ) for i in range(cfg.num_layers)]
    embed = get("model.embed_tokens.weight", (V, D))
    return DecoderParams(
        embed=embed,
        layers=layers,
        final_norm=get("model.norm.weight", (D,)),
        lm_head=load_lm_head(get, embed, cfg.tie_word_embeddings),
    )


def load_lm_head(get, embed: np.ndarray, tied: bool) -> np.ndarray:
    """The LM head [V, D] as the checkpoint holds it: the embedding's host array when tied."""
    return embed if tied else get("lm_head.weight", embed.shape)


def mlp_block(p: GatedMlp | MoeMlp, x: jax.Array | DeferredRmsNorm, cfg: DecoderConfig,
              real_tokens: jax.Array | None = None,
              residual: jax.Array | None = None) -> jax.Array:
    """A layer's MLP, dense or mixture-of-experts by its parameters' type, plus residual
    where given. real_tokens [T] bool (AttentionMetadata.real_tokens): the MoE routes only
    these; padding takes no expert's rows."""
    if not isinstance(p, MoeMlp):
        return gated_mlp(p, x, residual=residual)
    out = moe_mlp(p, materialized(x), cfg.moe, real_tokens)
    return out if residual is None else residual + out


# Jitted on its own: the step traces and lowers each distinct layer once, not once per
# layer (XLA inlines the calls, so the compiled program is the same as when unrolled).
@functools.partial(jax.jit, static_argnames=("cfg", "window"))
def _layer(layer: DecoderLayer, x, kv, batch: StepBatch, cfg: DecoderConfig, inv_freq, window):
    # The norms are left to the projections they feed and the residual adds to the products
    # before them: a quantized model's kernel calls take both (layers/linear.py).
    h = DeferredRmsNorm(x, layer.input_norm, cfg.rms_norm_eps)
    kv, x = self_attention(layer.attn, h, kv, batch.attention, inv_freq, head_dim=cfg.head_dim,
                           scale=cfg.head_dim**-0.5, norm_eps=cfg.rms_norm_eps,
                           sliding_window=window, residual=x)
    h = DeferredRmsNorm(x, layer.post_attn_norm, cfg.rms_norm_eps)
    return kv, mlp_block(layer.mlp, h, cfg, batch.attention.real_tokens(), residual=x)


def run_layers(layer_step: Callable, layers: list, kv_cache: KvCache, x: jax.Array,
               *per_layer: Sequence) -> tuple[KvCache, jax.Array]:
    """x through every layer in turn: layer_step(layer, x, layer cache, *that layer's entry
    of each `per_layer` sequence) -> (layer cache, x). A Python loop (unrolled) rather than
    lax.scan: scanning would carry the whole KV cache through the loop and copy it every
    step (docs/DESIGN.md); unrolled, each layer also gets its own static arguments (window,
    rope or not, MoE or dense). Each layer reads the arrays a layer before it may have
    written (layers of different KV cache groups share arrays, kernels/metadata.py)."""
    for i, (layer, *args) in enumerate(zip(layers, *per_layer, strict=True)):
        kv, x = layer_step(layer, x, kv_cache.layer(i), *args)
        kv_cache = kv_cache.updated(i, kv)
    return kv_cache, x


def forward(params: DecoderParams, kv_cache: KvCache, batch: StepBatch, cfg: DecoderConfig):
    """(params, kv_cache, batch) -> (kv_cache, hidden [T, D]) after the final norm; with
    pipeline stages, a batch of M micro-batches [M, T] -> hidden [M, T, D]."""
    inv_freq = jnp.asarray(cfg.inv_freq())
    windows = [cfg.sliding_window(i) for i in range(cfg.num_layers)]
    if batch.input_ids.ndim == 2:  # pipeline micro-batches [M, T] (parallel/pipeline.py)
        step = lambda layer, x, kv, b, window: _layer(layer, x, kv, b, cfg, inv_freq, window)  # noqa: E731
        kv_cache, x = run_microbatched(step, params.layers, kv_cache,
                                       embed_lookup(params.embed, batch.input_ids), batch, windows)
        return kv_cache, rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    step = lambda layer, x, kv, window: _layer(layer, x, kv, batch, cfg, inv_freq, window)  # noqa: E731
    x = embed_lookup(params.embed, batch.input_ids)
    kv_cache, x = run_layers(step, params.layers, kv_cache, x, windows)
    return kv_cache, rms_norm(x, params.final_norm, cfg.rms_norm_eps)


def compute_logits(params: DecoderParams, hidden: jax.Array, cfg=None) -> jax.Array:
    """hidden [B, D] -> logits [B, V] in float32."""
    del cfg  # the plain LM head needs none of it
    return project(hidden, params.lm_head, jnp.float32)


def kv_layers(cfg: DecoderConfig) -> list[KvLayer]:
    """Each layer's cache: full attention, or a sliding window where the config sets one."""
    return [KvLayer(SLIDING if w else FULL, cfg.num_kv_heads, cfg.head_dim, w)
            for w in (cfg.sliding_window(i) for i in range(cfg.num_layers))]


def _rope_checked(from_hf):
    """from_hf whose config's rope frequencies are worked out at once: a rope scaling the
    family does not turn by (or one missing a field) is refused when the config is read,
    not when the first step is traced."""
    def config_from_hf(hf: Mapping):
        cfg = from_hf(hf)
        try:
            cfg.inv_freq()
        except KeyError as e:
            raise ValueError(f"the config's rope scaling {dict(cfg.rope_scaling or ())} lacks "
                             f"{e}") from e
        return cfg

    return config_from_hf


def decoder_family(name: str, architectures: tuple[str, ...], config_cls, **overrides
                   ) -> ModelFamily:
    """A family record on this module's functions; `overrides` replace any of them."""
    fields = dict(config_from_hf=_rope_checked(config_cls.from_hf), load_params=load_params,
                  forward=forward,
                  compute_logits=compute_logits, kv_layers=kv_layers)
    return ModelFamily(name=name, architectures=architectures, **{**fields, **overrides})
