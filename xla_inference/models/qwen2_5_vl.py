"""Qwen2.5-VL: the Qwen2 decoder with multimodal rope (M-RoPE), fed the vision tower's
embeddings (multimodal/qwen2_5_vl_vision.py) in place of each image's or video's
placeholder tokens.

M-RoPE: every token has three rope positions (time, height, width); each chunk of
`mrope_section` frequencies turns by one of them. Text tokens have one position on all
three rows (plain rope, counted on from the largest position before them); an image's
placeholders get their merged patch's (frame, row, column) added to the position after
the text before it; a video's frame index is scaled to time (`second_per_grid_ts` x
`tokens_per_second`, as vLLM and the original Qwen2.5-VL do) and the text after it counts
on from its largest position on any row. Positions are numpy, per request, once
(`rope_positions`); the step carries each token's in a MultimodalStepBatch
(models/interface.py).
"""

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.layers.attention import self_attention
from xla_inference.layers.norms import rms_norm
from xla_inference.loading.checkpoint import RenamedTensors
from xla_inference.models import decoder
from xla_inference.models.decoder import (DecoderConfig, DecoderLayer, DecoderParams,
                                          decoder_family, with_hf_defaults)
from xla_inference.models.interface import (PIXEL_AFFINE, MultimodalItem, MultimodalStepBatch,
                                            MultimodalSupport, StepBatch)
from xla_inference.models.qwen2 import Qwen2Config, qwen_sliding_windows
from xla_inference.multimodal.qwen2_5_vl_vision import (VisionConfig, encoder_for_grid,
                                                        pixel_affine, vision_params)
from xla_inference.parallel.axes import weight

ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",)


# transformers' Qwen2_5_VLTextConfig defaults for keys that change numerics (its vision
# config's tokens_per_second defaults to 4).
_TEXT_DEFAULTS = {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_window_layers": 80,
                  "num_key_value_heads": 8}


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig(DecoderConfig):
    mrope_section: tuple[int, ...] = ()  # frequencies per rope row (time, height, width)
    vision: VisionConfig | None = None
    tokens_per_second: float = 1.0  # a video's time positions per second

    @classmethod
    def from_hf(cls, hf: Mapping) -> "Qwen2_5_VLConfig":
        # transformers >= 4.5x nests the language model's fields in text_config; older
        # configs keep them at the top level.
        text = with_hf_defaults({**hf, **(hf.get("text_config") or {})}, _TEXT_DEFAULTS)
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        section = tuple(int(s) for s in rope.pop("mrope_section", ()))
        if rope.get("rope_type", rope.get("type")) in ("mrope", "default", None):
            rope["rope_type"] = "default"  # M-RoPE's frequencies are the default ones
        text["rope_parameters"], text["rope_scaling"] = rope, None
        base = Qwen2Config.from_hf(text)
        vision = hf["vision_config"]
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(DecoderConfig)}
        fields["sliding_windows"] = qwen_sliding_windows(text)
        cfg = cls(**fields, mrope_section=section, vision=VisionConfig.from_hf(vision),
                  tokens_per_second=float(vision.get("tokens_per_second", 4)))
        if sum(section) != cfg.head_dim // 2:
            raise ValueError(f"Qwen2.5-VL: mrope_section {section} must sum to head_dim/2 "
                             f"({cfg.head_dim // 2})")
        return cfg


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Qwen2_5_VLParams(DecoderParams):
    # The vision tower's weights (multimodal/qwen2_5_vl_vision.vision_params), replicated.
    vision: dict = weight()


def load_params(tensors: Mapping[str, np.ndarray], cfg: Qwen2_5_VLConfig, dtype
                ) -> Qwen2_5_VLParams:
    """The decoder's tensors (checkpoints name them `model.*`, as Qwen2's; transformers'
    module tree says `model.language_model.*`) and the tower's `visual.*`, in float32 on
    the host (the tower is small; its products stay exact)."""
    if "model.embed_tokens.weight" not in tensors:
        tensors = RenamedTensors(tensors, _language_model_source)
    text = decoder.load_params(tensors, cfg, dtype)
    fields = {f.name: getattr(text, f.name) for f in dataclasses.fields(DecoderParams)}
    vision = jax.tree.map(np.asarray, vision_params(tensors, cfg.vision))
    return Qwen2_5_VLParams(**fields, vision=vision)


def _language_model_source(name: str, tensors: Mapping) -> str:
    """`model.*` (but the tower's `model.visual.*`) read as `model.language_model.*`."""
    if name.startswith("model.") and not name.startswith("model.visual."):
        return "model.language_model." + name[len("model."):]
    return name


@functools.partial(jax.jit, static_argnames=("cfg", "window"))
def _layer(layer: DecoderLayer, x, kv, batch: StepBatch, cfg: Qwen2_5_VLConfig, inv_freq,
           positions, window):
    h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
    kv, attn = self_attention(layer.attn, h, kv, batch.attention, inv_freq, head_dim=cfg.head_dim,
                              scale=cfg.head_dim**-0.5, norm_eps=cfg.rms_norm_eps,
                              sliding_window=window, mrope=(positions, cfg.mrope_section))
    x = x + attn
    return kv, x + decoder.mlp_block(layer.mlp, rms_norm(x, layer.post_attn_norm,
                                                         cfg.rms_norm_eps), cfg)


def forward(params: Qwen2_5_VLParams, kv_cache, batch: StepBatch, cfg: Qwen2_5_VLConfig):
    """The decoder's forward with M-RoPE; a MultimodalStepBatch's masked tokens take their
    row of its embeds in place of their token embedding. A plain StepBatch (the text
    model alone) runs with every rope row equal to the token's position."""
    inv_freq = jnp.asarray(cfg.inv_freq())
    x = params.embed[batch.input_ids]
    if isinstance(batch, MultimodalStepBatch):
        x = jnp.where(batch.embeds_mask[:, None], batch.embeds.astype(x.dtype), x)
        positions = batch.mrope_positions
    else:
        positions = jnp.broadcast_to(batch.attention.positions, (3, batch.num_tokens))
    step = lambda layer, x, kv, window: _layer(layer, x, kv, batch, cfg, inv_freq,  # noqa: E731
                                               positions, window)
    windows = [cfg.sliding_window(i) for i in range(cfg.num_layers)]
    kv_cache, x = decoder.run_layers(step, params.layers, kv_cache, x, windows)
    return kv_cache, rms_norm(x, params.final_norm, cfg.rms_norm_eps)


# --- Multimodal inputs -------------------------------------------------------------------


# The processor's tensors per modality: a video is a grid of t frame pairs (the tower's
# temporal patch covers two frames) run through the same tower as an image.
_PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}
_GRIDS = {"image": "image_grid_thw", "video": "video_grid_thw"}


def _grid(item: MultimodalItem) -> tuple[int, int, int]:
    return tuple(int(g) for g in np.asarray(item.data[_GRIDS[item.modality]]).reshape(-1))


def encode(params: Qwen2_5_VLParams, cfg: Qwen2_5_VLConfig, item: MultimodalItem) -> jax.Array:
    """One image's or video's embeddings [length, D]: the tower's program for its frame size
    (compiled at the first item of that size)."""
    if item.modality not in _PIXELS:
        raise ValueError(f"xla-inference serves Qwen2.5-VL image and video inputs, not "
                         f"{item.modality}")
    grid = _grid(item)
    patches = np.asarray(item.data[_PIXELS[item.modality]])
    # PIXEL_AFFINE, not the pixels' dtype, says whether the processor normalized them: with
    # vLLM's mm_device_do_normalize it does not, and its own Qwen2.5-VL applies the scale and
    # shift to whatever dtype comes (a processor may hand unnormalized pixels as floats).
    affine = item.data.get(PIXEL_AFFINE)
    if np.issubdtype(patches.dtype, np.floating):
        patches = np.asarray(patches, np.float32)
        if affine is None:
            affine = pixel_affine(cfg.vision)  # the processor normalized them: the identity
    elif patches.dtype != np.uint8 or affine is None:  # raw pixels would be read as normalized
        raise ValueError(f"Qwen2.5-VL's encoder takes float pixels, or uint8 pixels with the "
                         f"processor's normalization to apply ({PIXEL_AFFINE}); it got "
                         f"{patches.dtype} pixels{'' if affine is not None else ' alone'}")
    affine = np.asarray(affine, np.float32)  # one program per pixels' dtype, whatever the affine
    # Raw pixels reach the program as uint8: a quarter of the bytes to copy, no host pass.
    embeds = _encode_frames(params, cfg, grid, patches, affine)
    if embeds.shape[0] != item.length:
        raise ValueError(f"an {item.modality} of grid {grid} gives {embeds.shape[0]} "
                         f"embeddings; its prompt holds {item.length} placeholders")
    return embeds


def _encode_frames(params: Qwen2_5_VLParams, cfg: Qwen2_5_VLConfig, grid, patches, affine):
    """Every block attends inside one frame pair (windows, or the whole frame), so a video of
    t frame pairs is t calls of the image program of its frame size: no program per frame
    count, attention memory linear in t, and a warmed-up image size serves videos of that
    frame size too. The processor orders a video's patches frame by frame."""
    t, h, w = grid
    if patches.shape[0] != t * h * w:
        raise ValueError(f"{patches.shape[0]} patches for a grid of {grid}")
    program = encoder_for_grid(cfg.vision, (1, h, w))
    frames = [program(params.vision, patches[k * h * w:(k + 1) * h * w], affine) for k in range(t)]
    return frames[0] if t == 1 else np.concatenate([np.asarray(f) for f in frames])


def warm_up(params: Qwen2_5_VLParams, cfg: Qwen2_5_VLConfig, grid, pixel_dtype) -> None:
    """Compile (and run once) the tower's program for one image grid and the pixels' dtype
    the processor delivers, on a blank image: uint8 for raw pixels (vLLM's default for
    Qwen2.5-VL, mm_device_do_normalize), float32 for normalized ones (that setting off; the
    affine is an argument, so unnormalized floats run the float32 program too). A program
    of the other dtype compiles at its first item, should one ever come."""
    grid = tuple(int(g) for g in grid)
    patches = np.zeros((int(np.prod(grid)), cfg.vision.patch_features), pixel_dtype)
    jax.block_until_ready(encoder_for_grid(cfg.vision, grid)(params.vision, patches,
                                                             pixel_affine(cfg.vision)))


def rope_positions(cfg: Qwen2_5_VLConfig, num_prompt_tokens: int,
                   items: list[MultimodalItem]) -> tuple[np.ndarray, int]:
    """Each prompt token's (time, height, width) rope positions [3, P], and the delta a
    later token's position adds (vLLM's and transformers' get_rope_index)."""
    merge = cfg.vision.spatial_merge_size
    pieces, done, next_position = [], 0, 0
    for item in sorted(items, key=lambda i: i.offset):
        text = item.offset - done
        pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
        t, h, w = _grid(item)
        frames = np.arange(t)
        if item.modality == "video":
            seconds = float(np.asarray(item.data.get("second_per_grid_ts", 1.0)).reshape(-1)[0])
            frames = (frames * seconds * cfg.tokens_per_second).astype(np.int64)
        grid = np.stack(np.meshgrid(frames, np.arange(h // merge), np.arange(w // merge),
                                    indexing="ij")).reshape(3, -1)
        pieces.append(grid + next_position + text)
        done = item.offset + grid.shape[1]
        next_position = int(pieces[-1].max()) + 1
    rest = num_prompt_tokens - done
    pieces.append(np.broadcast_to(np.arange(rest), (3, rest)) + next_position)
    positions = np.concatenate(pieces, axis=1).astype(np.int32)
    return positions, int(positions.max(initial=-1)) + 1 - num_prompt_tokens


FAMILY = decoder_family(
    "qwen2_5_vl", ARCHITECTURES, Qwen2_5_VLConfig, load_params=load_params, forward=forward,
    multimodal=MultimodalSupport(modalities=("image", "video"), encode=encode,
                                 rope_positions=rope_positions, warm_up=warm_up,
                                 raw_pixels=True))
