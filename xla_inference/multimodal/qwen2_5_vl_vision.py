"""Qwen2.5-VL's vision tower in JAX: pixel patches of one image (or video) to LM embeddings.

The tower: a linear patch embedding (a Conv3d whose stride equals its kernel), blocks of
pre-norm attention + gated MLP with 2-D rotary positions (a patch's row and column), most
blocks attending inside windows of `window_size` pixels and a few (`fullatt_block_indexes`)
over the whole frame, then a merger that concatenates each 2x2 group of patches and
projects it to the LM's width.

The processor hands patches ordered block-major over the 2x2 merge groups; the tower runs
with the merge groups reordered window by window (so each window is contiguous) and
restores the order at the end. Here every ordering and every attention segment is numpy,
computed from the image's grid (t, h, w) at trace time: one compiled program per grid
(`encoder_for_grid` caches them), and one image per call, as attention never crosses images.

Attention runs per segment (a window, or a frame in the full blocks), batched as
[segments, heads, S, S] scores: a windowed block costs the windows' squares, not the whole
image's [N, N] under a mask. Windows cut at the image's edge are shorter; those are padded
to the longest window with masked keys, and their padded rows dropped.
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.multimodal.attention import segment_attention
from xla_inference.multimodal.weights import float32_reader


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_hf(cls, vision_config: dict) -> "VisionConfig":
        if vision_config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Qwen2.5-VL vision: hidden_act {vision_config['hidden_act']!r} is not served")
        rope = vision_config.get("rope_parameters") or {}
        return cls(depth=vision_config["depth"], hidden_size=vision_config["hidden_size"],
                   intermediate_size=vision_config["intermediate_size"],
                   num_heads=vision_config["num_heads"], out_hidden_size=vision_config["out_hidden_size"],
                   patch_size=vision_config.get("patch_size", 14),
                   temporal_patch_size=vision_config.get("temporal_patch_size", 2),
                   in_channels=vision_config.get("in_channels", 3),
                   spatial_merge_size=vision_config.get("spatial_merge_size", 2),
                   window_size=vision_config.get("window_size", 112),
                   fullatt_block_indexes=tuple(vision_config.get("fullatt_block_indexes", (7, 15, 23, 31))),
                   rope_theta=float(rope.get("rope_theta", 10000.0)))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_features(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2


# --- Layout of one image: numpy, from its grid -------------------------------------------


@dataclass(frozen=True)
class SegmentLayout:
    """The tower's rows (each segment a contiguous run of them) as [segments, size] slots for
    a batched attention. `gather`, `valid` and `scatter` are None when every segment has
    `size` rows: then a reshape is the layout."""
    count: int
    size: int
    gather: np.ndarray | None = None   # (count, size) tower row in each slot (padding: any row)
    valid: np.ndarray | None = None    # (count, size) the slots that hold a row of the segment
    scatter: np.ndarray | None = None  # (N,) flat slot of each tower row


def segment_layout(segment_ids: np.ndarray) -> SegmentLayout:
    """Slots for segments given as each tower row's segment id, equal ids contiguous."""
    starts = np.flatnonzero(np.r_[True, segment_ids[1:] != segment_ids[:-1]])
    lengths = np.diff(np.r_[starts, segment_ids.size])
    if len(np.unique(segment_ids)) != len(starts):
        raise ValueError("attention segments must be contiguous runs of the tower's rows")
    size = int(lengths.max())
    if (lengths == size).all():
        return SegmentLayout(len(starts), size)
    slot = np.arange(size)
    valid = slot[None, :] < lengths[:, None]
    gather = starts[:, None] + np.where(valid, slot[None, :], 0)
    scatter = (np.arange(len(starts))[:, None] * size + slot[None, :])[valid]
    return SegmentLayout(len(starts), size, gather, valid, scatter)


@dataclass(frozen=True)
class GridLayout:
    """Per patch, in the tower's (window) order: its (row, column) and attention segments."""
    patch_order: np.ndarray      # (N,) processor row of each tower row
    positions: np.ndarray        # (N, 2) row and column of each tower row
    window_segment: np.ndarray   # (N,) windowed blocks attend within equal values
    frame_segment: np.ndarray    # (N,) full blocks attend within a frame
    merged_restore: np.ndarray   # (N / merge_unit,) processor order of the merged rows


def grid_layout(config: VisionConfig, grid: tuple[int, int, int]) -> GridLayout:
    t, h, w = grid
    m = config.spatial_merge_size
    # Processor order: per frame, 2x2 merge groups row-major, patches row-major in a group.
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    def block_major(a):
        return a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    positions = np.tile(np.stack([block_major(rows), block_major(cols)], -1), (t, 1))
    frame = np.repeat(np.arange(t), h * w)

    group_order, group_window = _window_order(config, t, h // m, w // m)
    patch_order = (group_order[:, None] * config.merge_unit + np.arange(config.merge_unit)).reshape(-1)
    return GridLayout(patch_order=patch_order, positions=positions[patch_order],
                      window_segment=np.repeat(group_window, config.merge_unit),
                      frame_segment=frame[patch_order], merged_restore=np.argsort(group_order))


def _window_order(config: VisionConfig, t: int, gh: int, gw: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge groups listed window by window (windows row-major, groups row-major inside),
    and the window number of each listed group."""
    side = config.window_size // config.spatial_merge_size // config.patch_size
    group_ids = np.arange(t * gh * gw).reshape(t, gh, gw)
    order, window = [], []
    for frame in range(t):
        for top in range(0, gh, side):
            for left in range(0, gw, side):
                members = group_ids[frame, top:top + side, left:left + side].reshape(-1)
                order.append(members)
                window.append(np.full(members.size, len(window)))
    return np.concatenate(order), np.concatenate(window)


# --- Weights ---------------------------------------------------------------------------------


def vision_params(tensors: Mapping[str, np.ndarray], config: VisionConfig,
                  prefix: str | None = None, dtype=jnp.float32) -> dict:
    """The tower's weights from HF-named tensors (`prefix` + transformers' module names),
    as (in, out) matrices. Checkpoints (the hub's, and transformers' save_pretrained) name
    them `visual.*`; transformers' module tree says `model.visual.*`: either is found."""
    if prefix is None:
        prefix = "visual." if "visual.patch_embed.proj.weight" in tensors else "model.visual."
    read = float32_reader(tensors, (prefix,), "Qwen2.5-VL vision tower")

    def get(name):
        return jnp.asarray(read(prefix + name), dtype)

    def linear(name, bias=True):
        out = {"w": get(name + ".weight").T}
        if bias:
            out["b"] = get(name + ".bias")
        return out
    blocks = []
    for i in range(config.depth):
        p = f"blocks.{i}."
        blocks.append({"norm1": get(p + "norm1.weight"), "norm2": get(p + "norm2.weight"),
                       "qkv": linear(p + "attn.qkv"), "proj": linear(p + "attn.proj"),
                       "gate": linear(p + "mlp.gate_proj"), "up": linear(p + "mlp.up_proj"),
                       "down": linear(p + "mlp.down_proj")})
    patch = get("patch_embed.proj.weight").reshape(config.hidden_size, -1).T
    return {"patch_embed": patch, "blocks": blocks,
            "merger": {"norm": get("merger.ln_q.weight"), "fc1": linear("merger.mlp.0"),
                       "fc2": linear("merger.mlp.2")}}


# --- The tower -------------------------------------------------------------------------------


def _rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def _linear(x, p):
    return x @ p["w"] + p["b"]


def _rotary_cos_sin(config: VisionConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin over the head dim: a quarter of the frequencies for the row, a quarter for the
    column, the half repeated (rotate-half convention)."""
    half = config.head_dim // 2
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, half, 2, dtype=np.float32) / half)
    angles = positions[:, :, None].astype(np.float32) * inv_freq  # (N, 2, head_dim / 4)
    angles = np.concatenate([angles[:, 0], angles[:, 1]], -1)
    angles = np.concatenate([angles, angles], -1)
    return np.cos(angles), np.sin(angles)


def _rotate(x, cos, sin):
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


def _attention(config, p, x, cos, sin, segments: SegmentLayout):
    n, heads, d = x.shape[0], config.num_heads, config.head_dim
    q, k, v = jnp.moveaxis(_linear(x, p["qkv"]).reshape(n, 3, heads, d), 1, 0)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if segments.gather is None:
        q, k, v = (a.reshape(segments.count, segments.size, heads, d) for a in (q, k, v))
    else:
        q, k, v = (a[segments.gather] for a in (q, k, v))
    # [segments, heads, S, d]: XLA's CPU dots want their batch dimensions leading (a dot
    # batched over (segment, head) in the middle of its operands ran 3x slower).
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
    out = segment_attention(q, k, v, segments.valid, d ** -0.5)
    out = jnp.swapaxes(out, 1, 2).reshape(-1, config.hidden_size)
    if segments.scatter is not None:
        out = out[segments.scatter]
    return _linear(out, p["proj"])


def _block(config, p, x, cos, sin, segments: SegmentLayout):
    x = x + _attention(config, p, _rms_norm(x, p["norm1"], config.rms_norm_eps), cos, sin, segments)
    h = _rms_norm(x, p["norm2"], config.rms_norm_eps)
    return x + _linear(jax.nn.silu(_linear(h, p["gate"])) * _linear(h, p["up"]), p["down"])


def pixel_affine(config: VisionConfig, scale=None, shift=None) -> np.ndarray:
    """[2, in_channels] float32: the per-channel scale and shift that take the pixels the
    tower is given to the processor's normalized ones (raw uint8 pixels, when vLLM leaves the
    normalization to the model: rescale / std and -mean / std). None: the identity, for
    pixels that come normalized."""
    c = config.in_channels
    return np.stack([np.ones(c) if scale is None else np.broadcast_to(scale, c),
                     np.zeros(c) if shift is None else np.broadcast_to(shift, c)]).astype(np.float32)


def _normalize(config: VisionConfig, patches, affine):
    """Each patch feature (channel, frame, row, column as the Conv3d's weight) times its
    channel's scale plus its shift."""
    channel = np.repeat(np.arange(config.in_channels), config.patch_features // config.in_channels)
    return patches.astype(jnp.float32) * affine[0][channel] + affine[1][channel]


def encode(config: VisionConfig, grid: tuple[int, int, int], params: dict, patches: jax.Array,
           affine: jax.Array | None = None) -> jax.Array:
    """(t*h*w, patch_features) patches of one image, in the processor's order, to its
    (t*h*w / merge_unit, out_hidden_size) embeddings, in the LM's placeholder order.
    affine: pixel_affine's, for patches that still need the processor's normalization."""
    if affine is not None:
        patches = _normalize(config, patches, affine)
    layout = grid_layout(config, grid)
    cos, sin = _rotary_cos_sin(config, layout.positions)
    windows = segment_layout(layout.window_segment)
    frames = segment_layout(layout.frame_segment)

    # The embedding is per row: project in the processor's order, then reorder the narrower rows.
    x = (patches.astype(params["patch_embed"].dtype) @ params["patch_embed"])[layout.patch_order]
    for i, p in enumerate(params["blocks"]):
        x = _block(config, p, x, cos, sin, frames if i in config.fullatt_block_indexes else windows)

    merger = params["merger"]
    merged = _rms_norm(x, merger["norm"], config.rms_norm_eps)
    merged = merged.reshape(-1, config.merge_unit * config.hidden_size)
    merged = _linear(jax.nn.gelu(_linear(merged, merger["fc1"]), approximate=False), merger["fc2"])
    return merged[layout.merged_restore]


@lru_cache(maxsize=None)
def encoder_for_grid(config: VisionConfig, grid: tuple[int, int, int]):
    """The jitted tower for one image grid (t, h, w): params, patches, affine (pixel_affine's)
    -> embeddings. One program per patches' dtype: float32 (normalized) or uint8 (raw)."""
    return jax.jit(lambda params, patches, affine: encode(config, grid, params, patches, affine))


def encode_images(config: VisionConfig, params: dict, pixel_values: np.ndarray,
                  grids: list[tuple[int, int, int]]) -> list[jax.Array]:
    """Embeddings per image, for the processor's concatenated `pixel_values` and `image_grid_thw`."""
    outputs, start = [], 0
    for grid in grids:
        grid = tuple(int(g) for g in grid)
        rows = int(np.prod(grid))
        outputs.append(encoder_for_grid(config, grid)(params, np.asarray(pixel_values[start:start + rows]),
                                                      pixel_affine(config)))
        start += rows
    if start != len(pixel_values):
        raise ValueError(f"pixel_values has {len(pixel_values)} patches; the grids {grids} "
                         f"account for {start}")
    return outputs
