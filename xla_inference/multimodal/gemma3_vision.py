"""Gemma 3's image encoder in JAX: the SigLIP vision tower and Gemma 3's multimodal
projector, one square image (the processor resizes every image, and every pan-and-scan
crop, to `image_size`) to its `mm_tokens_per_image` LM embeddings.

The tower: a linear patch embedding (a Conv2d whose stride equals its kernel) plus a
learned position per patch, pre-LayerNorm encoder layers (full attention over the image's
patches, a gelu-tanh MLP), and a final LayerNorm. The projector average-pools the patch
grid down to sqrt(mm_tokens_per_image) tokens a side, normalizes them with Gemma's
(1 + w) RMSNorm and projects them to the LM's width. Every image has the same size, so
one program serves every image (`encoder_program`), compiled at warm-up. Its pixels come
normalized by the processor, or raw (uint8, vLLM's mm_device_do_normalize) with the
processor's per-channel scale and shift, applied inside the program.
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.multimodal.attention import segment_attention
from xla_inference.multimodal.weights import float32_reader, tower_prefix


@dataclass(frozen=True)
class Gemma3VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    text_hidden_size: int  # the projector's output width
    mm_tokens_per_image: int = 256
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_hf(cls, hf: Mapping) -> "Gemma3VisionConfig":
        vision, text = hf["vision_config"], hf.get("text_config") or {}
        if vision.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"Gemma 3 vision: hidden_act {vision['hidden_act']!r} is not served")
        if vision.get("vision_use_head", False):
            raise ValueError("Gemma 3 vision: a SigLIP tower with a pooling head "
                             "(vision_use_head) is not Gemma 3's")
        cfg = cls(hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
                  num_layers=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
                  image_size=vision["image_size"], patch_size=vision["patch_size"],
                  text_hidden_size=text.get("hidden_size", hf.get("hidden_size")),
                  mm_tokens_per_image=int(hf.get("mm_tokens_per_image", 256)),
                  num_channels=vision.get("num_channels", 3),
                  layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)))
        side = cfg.tokens_per_side
        if side * side != cfg.mm_tokens_per_image or cfg.patches_per_side % side:
            raise ValueError(f"Gemma 3 vision: {cfg.patches_per_side}x{cfg.patches_per_side} "
                             f"patches do not pool evenly to mm_tokens_per_image "
                             f"{cfg.mm_tokens_per_image}")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        return int(round(self.mm_tokens_per_image ** 0.5))


# --- Weights ---------------------------------------------------------------------------------

# Where checkpoints keep the tower: the Hub's (and transformers < 5's) names, transformers
# 5's save_pretrained names, and transformers' module tree.
_TOWER_PREFIXES = ("vision_tower.vision_model.", "vision_tower.",
                   "model.vision_tower.vision_model.", "model.vision_tower.")
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


def vision_params(tensors: Mapping[str, np.ndarray], config: Gemma3VisionConfig) -> dict:
    """The tower's and projector's weights from HF-named tensors, as float32 host arrays,
    linear weights as (in, out) matrices."""
    tower = tower_prefix(tensors, _TOWER_PREFIXES, "embeddings.patch_embedding.weight",
                         "Gemma 3 vision")
    projector = tower_prefix(tensors, _PROJECTOR_PREFIXES, "mm_input_projection_weight",
                             "Gemma 3 vision")

    get = float32_reader(tensors, (tower, projector), "Gemma 3 vision tower")

    def linear(name):
        return {"w": get(name + ".weight").T, "b": get(name + ".bias")}

    def layer_norm(name):
        return {"w": get(name + ".weight"), "b": get(name + ".bias")}

    layers = []
    for i in range(config.num_layers):
        p = f"{tower}encoder.layers.{i}."
        layers.append({"norm1": layer_norm(p + "layer_norm1"), "norm2": layer_norm(p + "layer_norm2"),
                       "q": linear(p + "self_attn.q_proj"), "k": linear(p + "self_attn.k_proj"),
                       "v": linear(p + "self_attn.v_proj"), "o": linear(p + "self_attn.out_proj"),
                       "fc1": linear(p + "mlp.fc1"), "fc2": linear(p + "mlp.fc2")})
    patch = get(tower + "embeddings.patch_embedding.weight")  # [hidden, C, p, p]
    return {
        "patch_embed": {"w": patch.reshape(config.hidden_size, -1).T,
                        "b": get(tower + "embeddings.patch_embedding.bias")},
        "positions": get(tower + "embeddings.position_embedding.weight"),  # [patches, hidden]
        "layers": layers,
        "post_norm": layer_norm(tower + "post_layernorm"),
        "projector": {"norm": get(projector + "mm_soft_emb_norm.weight"),
                      "w": get(projector + "mm_input_projection_weight")},  # [hidden, text]
    }


# --- The tower and projector -------------------------------------------------------------------


def _layer_norm(x, p, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["w"] + p["b"]


def _linear(x, p):
    return x @ p["w"] + p["b"]


def _patches(config: Gemma3VisionConfig, pixels: jax.Array) -> jax.Array:
    """[C, H, W] pixels -> [patches, C * p * p], patches row-major, each flattened as the
    Conv2d weight is (channel, row, column)."""
    c, n, p = config.num_channels, config.patches_per_side, config.patch_size
    return pixels.reshape(c, n, p, n, p).transpose(1, 3, 0, 2, 4).reshape(n * n, c * p * p)


def _attention(config: Gemma3VisionConfig, p, x):
    n, heads, d = x.shape[0], config.num_heads, config.head_dim
    # One segment (the image) of [heads, n, d]: multimodal/attention.py's layout.
    q, k, v = (_linear(x, p[name]).reshape(n, heads, d).transpose(1, 0, 2)[None]
               for name in ("q", "k", "v"))
    out = segment_attention(q, k, v, None, d ** -0.5)[0]
    return _linear(out.transpose(1, 0, 2).reshape(n, config.hidden_size), p["o"])


def _encoder_layer(config: Gemma3VisionConfig, p, x):
    eps = config.layer_norm_eps
    x = x + _attention(config, p, _layer_norm(x, p["norm1"], eps))
    h = jax.nn.gelu(_linear(_layer_norm(x, p["norm2"], eps), p["fc1"]), approximate=True)
    return x + _linear(h, p["fc2"])


def _project(config: Gemma3VisionConfig, p, hidden):
    """[patches, hidden] -> [mm_tokens_per_image, text_hidden]: mean over each k x k block
    of the patch grid (tokens row-major), Gemma's (1 + w) RMSNorm, the projection."""
    n, side = config.patches_per_side, config.tokens_per_side
    k = n // side
    pooled = hidden.reshape(side, k, side, k, -1).mean(axis=(1, 3)).reshape(side * side, -1)
    normed = pooled * jax.lax.rsqrt(jnp.mean(pooled * pooled, axis=-1, keepdims=True)
                                    + config.layer_norm_eps)
    return (normed * (1.0 + p["norm"])) @ p["w"]


def pixel_affine(config: Gemma3VisionConfig) -> np.ndarray:
    """[2, channels] float32: the identity scale and shift, for pixels the processor
    normalized (raw uint8 ones come with the processor's: models/interface.PIXEL_AFFINE)."""
    c = config.num_channels
    return np.stack([np.ones(c), np.zeros(c)]).astype(np.float32)


def encode_image(config: Gemma3VisionConfig, params: dict, pixels: jax.Array,
                 affine: jax.Array) -> jax.Array:
    """One image's pixels [C, image_size, image_size] -> its LM embeddings
    [mm_tokens_per_image, text_hidden], float32. affine [2, C]: each channel's scale and
    shift to the processor's normalized pixels (pixel_affine's identity when they are)."""
    pixels = pixels.astype(jnp.float32) * affine[0][:, None, None] + affine[1][:, None, None]
    x = _linear(_patches(config, pixels), params["patch_embed"])
    x = x + params["positions"]
    for p in params["layers"]:
        x = _encoder_layer(config, p, x)
    x = _layer_norm(x, params["post_norm"], config.layer_norm_eps)
    return _project(config, params["projector"], x)


@lru_cache(maxsize=None)
def encoder_program(config: Gemma3VisionConfig):
    """The jitted encoder of one image: params, pixels [C, S, S], affine [2, C] ->
    [tokens, text_hidden]. Every image (and every pan-and-scan crop) has the same size: one
    program per pixels' dtype (uint8 raw, float32 normalized) serves all."""
    return jax.jit(lambda params, pixels, affine: encode_image(config, params, pixels, affine))
