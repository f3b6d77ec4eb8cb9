"""Llama 4's image encoder in JAX: the vision tower, its pixel-shuffle adapter and the
multimodal projector, one square tile (the processor cuts every image into tiles of
`image_size`, plus a global tile of the whole image when there are several) to its
`tokens_per_tile` LM embeddings.

The tower: a linear patch embedding (torch's Unfold then a Linear without bias: each patch
flattened channel, row, column), a learned class embedding appended after the patches, a
learned position per token, a LayerNorm before the encoder layers and one after them.
The layers are pre-LayerNorm, full attention over the tile's tokens with a 2-D rotary
embedding (the first half of each head's adjacent-element pairs turns with the patch's
column + 1, the second half with its row + 1; the class token does not turn), and an
exact-gelu MLP. The class token is then dropped, the patch grid pixel-shuffled (each
2x2 block of patches, for ratio 0.5, folded into one token of 4x the width), and the
adapter (two bias-free linears, each followed by gelu) and the projector (a bias-free
linear) take it to the LM's width. Every tile has the same size, so one program serves
every tile (`encoder_program`), compiled at warm-up. Its pixels come normalized by the
processor (in bfloat16, as transformers' Llama 4 processor does).
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.multimodal.attention import segment_attention
from xla_inference.multimodal.weights import float32_reader, tower_prefix

# nn.LayerNorm's default: the released checkpoints' (and transformers') vision norms use it
# whatever the config's norm_eps says.
_LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class Llama4VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int  # the tile's side
    patch_size: int
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    text_hidden_size: int  # the projector's output width
    rope_theta: float = 10_000.0
    num_channels: int = 3

    @classmethod
    def from_hf(cls, hf: Mapping) -> "Llama4VisionConfig":
        vision, text = hf["vision_config"], hf.get("text_config") or {}
        if vision.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"Llama 4 vision: hidden_act {vision['hidden_act']!r} is not served "
                             "(the tower applies exact gelu, as transformers' does)")
        if vision.get("multi_modal_projector_bias", False):
            raise ValueError("Llama 4 vision: an adapter with biases (multi_modal_projector_bias) "
                             "is not served (the released models have none)")
        rope = vision.get("rope_parameters") or {}
        cfg = cls(hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
                  num_layers=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
                  image_size=vision["image_size"], patch_size=vision["patch_size"],
                  pixel_shuffle_ratio=float(vision.get("pixel_shuffle_ratio", 0.5)),
                  projector_input_dim=vision["projector_input_dim"],
                  projector_output_dim=vision["projector_output_dim"],
                  text_hidden_size=text["hidden_size"],
                  rope_theta=float(rope.get("rope_theta", vision.get("rope_theta", 10_000.0))),
                  num_channels=vision.get("num_channels", 3))
        cfg._check(vision)
        return cfg

    def _check(self, vision: Mapping) -> None:
        n, ratio = self.patches_per_side, self.pixel_shuffle_ratio
        shuffled = self.hidden_size / ratio**2
        if self.image_size % self.patch_size or (n * ratio) % 1 or shuffled % 1:
            raise ValueError(f"Llama 4 vision: {n}x{n} patches of width {self.hidden_size} do not "
                             f"pixel-shuffle evenly at ratio {ratio}")
        if int(shuffled) != self.intermediate_size:
            raise ValueError(f"Llama 4 vision: the adapter takes intermediate_size "
                             f"{self.intermediate_size} features, the pixel shuffle gives "
                             f"{int(shuffled)}")
        if vision.get("vision_output_dim", self.projector_output_dim) != self.projector_output_dim:
            raise ValueError("Llama 4 vision: vision_output_dim differs from projector_output_dim")
        if self.head_dim % 4:
            raise ValueError(f"Llama 4 vision: head dim {self.head_dim} does not split into "
                             "row and column rotary pairs")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return round((self.patches_per_side * self.pixel_shuffle_ratio) ** 2)


# --- Weights ---------------------------------------------------------------------------------

# Where checkpoints keep the tower and projector: the Hub's (and transformers'
# save_pretrained) names, and transformers' module tree.
_TOWER_PREFIXES = ("vision_model.", "model.vision_model.")
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


def vision_params(tensors: Mapping[str, np.ndarray], config: Llama4VisionConfig) -> dict:
    """The tower's, adapter's and projector's weights from HF-named tensors, as float32 host
    arrays, linear weights as (in, out) matrices."""
    tower = tower_prefix(tensors, _TOWER_PREFIXES, "patch_embedding.linear.weight",
                         "Llama 4 vision")
    projector = tower_prefix(tensors, _PROJECTOR_PREFIXES, "linear_1.weight",
                             "Llama 4 vision")

    get = float32_reader(tensors, (tower, projector), "Llama 4 vision tower")

    def linear(name):
        return {"w": get(name + ".weight").T, "b": get(name + ".bias")}

    def layer_norm(name):
        return {"w": get(name + ".weight"), "b": get(name + ".bias")}

    layers = []
    for i in range(config.num_layers):
        p = f"{tower}model.layers.{i}."
        layers.append({"norm1": layer_norm(p + "input_layernorm"),
                       "norm2": layer_norm(p + "post_attention_layernorm"),
                       "q": linear(p + "self_attn.q_proj"), "k": linear(p + "self_attn.k_proj"),
                       "v": linear(p + "self_attn.v_proj"), "o": linear(p + "self_attn.o_proj"),
                       "fc1": linear(p + "mlp.fc1"), "fc2": linear(p + "mlp.fc2")})
    return {
        "patch_embed": get(tower + "patch_embedding.linear.weight").T,  # [C * p * p, hidden]
        "class_embed": get(tower + "class_embedding"),  # [hidden]
        "positions": get(tower + "positional_embedding_vlm"),  # [patches + 1, hidden]
        "pre_norm": layer_norm(tower + "layernorm_pre"),
        "layers": layers,
        "post_norm": layer_norm(tower + "layernorm_post"),
        "adapter_fc1": get(tower + "vision_adapter.mlp.fc1.weight").T,
        "adapter_fc2": get(tower + "vision_adapter.mlp.fc2.weight").T,
        "projector": get(projector + "linear_1.weight").T,  # [projector_output_dim, text]
    }


# --- Rotary embedding ------------------------------------------------------------------------


def rotary_angles(config: Llama4VisionConfig) -> np.ndarray:
    """[patches + 1, head_dim / 2] float32: the angle each adjacent-element pair of a head
    turns by, per token (patches row-major, then the class token, which does not turn).
    Pairs 0..head_dim/4 - 1 turn with the patch's column + 1, the rest with its row + 1,
    at frequencies theta^(-4k / head_dim)."""
    n, quarter = config.patches_per_side, config.head_dim // 4
    freqs = config.rope_theta ** (-np.arange(quarter, dtype=np.float64) * 4 / config.head_dim)
    patch = np.arange(n * n)
    column, row = patch % n + 1, patch // n + 1
    angles = np.concatenate([column[:, None] * freqs, row[:, None] * freqs], axis=1)
    return np.concatenate([angles, np.zeros((1, 2 * quarter))]).astype(np.float32)


def _rotate_pairs(x, cos, sin):
    """x [S, heads, d]: each (2i, 2i + 1) pair turned by its token's angle (cos, sin
    [S, d / 2]), as a complex product."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return jnp.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(x.shape)


# --- The tower, adapter and projector ----------------------------------------------------------


def _layer_norm(x, p):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + _LAYER_NORM_EPS) * p["w"] + p["b"]


def _linear(x, p):
    return x @ p["w"] + p["b"]


def _patches(config: Llama4VisionConfig, pixels: jax.Array) -> jax.Array:
    """[C, H, W] pixels -> [patches, C * p * p], patches row-major, each flattened as torch's
    Unfold does (channel, row, column)."""
    c, n, p = config.num_channels, config.patches_per_side, config.patch_size
    return pixels.reshape(c, n, p, n, p).transpose(1, 3, 0, 2, 4).reshape(n * n, c * p * p)


def _attention(config: Llama4VisionConfig, p, x, cos, sin):
    s, heads, d = x.shape[0], config.num_heads, config.head_dim
    q, k, v = (_linear(x, p[name]).reshape(s, heads, d) for name in ("q", "k", "v"))
    q, k = _rotate_pairs(q, cos, sin), _rotate_pairs(k, cos, sin)
    # One segment (the tile) of [heads, S, d]: multimodal/attention.py's layout.
    q, k, v = (t.transpose(1, 0, 2)[None] for t in (q, k, v))
    out = segment_attention(q, k, v, None, d ** -0.5)[0]
    return _linear(out.transpose(1, 0, 2).reshape(s, config.hidden_size), p["o"])


def _encoder_layer(config: Llama4VisionConfig, p, x, cos, sin):
    x = x + _attention(config, p, _layer_norm(x, p["norm1"]), cos, sin)
    h = jax.nn.gelu(_linear(_layer_norm(x, p["norm2"]), p["fc1"]), approximate=False)
    return x + _linear(h, p["fc2"])


def pixel_shuffle(config: Llama4VisionConfig, x: jax.Array) -> jax.Array:
    """[n * n, C] patches -> [(n r)^2, C / r^2] tokens, the folding transformers' Llama 4
    does: columns folded into channels, the grid transposed, rows folded, transposed back."""
    n, r, c = config.patches_per_side, config.pixel_shuffle_ratio, x.shape[-1]
    x = x.reshape(n, round(n * r), round(c / r)).transpose(1, 0, 2)
    x = x.reshape(round(n * r), round(n * r), round(c / r**2)).transpose(1, 0, 2)
    return x.reshape(-1, x.shape[-1])


def encode_tile(config: Llama4VisionConfig, params: dict, pixels: jax.Array) -> jax.Array:
    """One tile's normalized pixels [C, image_size, image_size] -> its LM embeddings
    [tokens_per_tile, text_hidden], float32."""
    x = _patches(config, pixels.astype(jnp.float32)) @ params["patch_embed"]
    x = jnp.concatenate([x, params["class_embed"][None]]) + params["positions"]
    x = _layer_norm(x, params["pre_norm"])
    angles = jnp.asarray(rotary_angles(config))
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    for p in params["layers"]:
        x = _encoder_layer(config, p, x, cos, sin)
    x = _layer_norm(x, params["post_norm"])[:-1]  # the class token dropped
    x = jax.nn.gelu(pixel_shuffle(config, x) @ params["adapter_fc1"], approximate=False)
    x = jax.nn.gelu(x @ params["adapter_fc2"], approximate=False)
    return x @ params["projector"]


@lru_cache(maxsize=None)
def encoder_program(config: Llama4VisionConfig):
    """The jitted encoder of one tile: params, pixels [C, S, S] -> [tokens, text_hidden].
    Every tile (and every global tile) has the same size: one program serves all."""
    return jax.jit(lambda params, pixels: encode_tile(config, params, pixels))
