"""Gemma 3 with images (Gemma3ForConditionalGeneration): the Gemma 3 text decoder
(models/gemma3.py) fed the SigLIP tower's embeddings (multimodal/gemma3_vision.py) at each
image's soft tokens.

An image's prompt text is `<start_of_image>`, mm_tokens_per_image soft tokens,
`<end_of_image>` (vLLM's placeholder spans all of them; only the soft tokens take encoder
rows, MultimodalItem.is_embed). The soft tokens' rows are the projector's output as is
(the text embedding's sqrt(hidden) scale is not applied to them).

Attention: a soft token sees every soft token of its own image, before and after it (as
transformers' Gemma 3 and vLLM, which calls such models "mm prefix LMs"); everything else
is causal. The step carries no mask: a soft token attends up to the position of the last
soft token of its image (`_mask_positions`), which the step holds because vLLM schedules
an image's placeholders whole (disable_chunked_mm_input, which the platform sets as vLLM
does on CUDA). On sliding-window layers that moves the window's start too: exact only
while the image ends inside the first window (its last soft token at a position below
`sliding_window`); later images are refused (validate_request, and `_check_items` here).
"""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.kernels.metadata import KvCache
from xla_inference.layers.norms import gemma_rms_norm
from xla_inference.loading.checkpoint import RenamedTensors, language_model_source
from xla_inference.models import gemma3
from xla_inference.models.decoder import decoder_family, run_layers, with_hf_defaults
from xla_inference.models.gemma3 import HF_TEXT_DEFAULTS, Gemma3Config, Gemma3Params
from xla_inference.models.interface import (PIXEL_AFFINE, MultimodalItem, MultimodalStepBatch,
                                            MultimodalSupport, StepBatch)
from xla_inference.multimodal.gemma3_vision import (Gemma3VisionConfig, encoder_program,
                                                    pixel_affine, vision_params)
from xla_inference.parallel.axes import weight

ARCHITECTURES = ("Gemma3ForConditionalGeneration",)

_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "image_size": 224, "patch_size": 16}


@dataclasses.dataclass(frozen=True)
class Gemma3MMConfig(Gemma3Config):
    vision: Gemma3VisionConfig | None = None
    image_token_id: int = 262_144

    @classmethod
    def from_hf(cls, hf: Mapping) -> "Gemma3MMConfig":
        text = with_hf_defaults(hf.get("text_config") or {}, HF_TEXT_DEFAULTS)
        text["tie_word_embeddings"] = hf.get("tie_word_embeddings",
                                             text.get("tie_word_embeddings", True))
        base = Gemma3Config.from_hf(text)
        vision = {**_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
        hf = {**hf, "vision_config": vision, "text_config": text}
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Gemma3Config)}
        image_token = hf.get("image_token_index", hf.get("image_token_id", 262_144))
        return cls(**fields, vision=Gemma3VisionConfig.from_hf(hf), image_token_id=int(image_token))

    @property
    def bidirectional_limit(self) -> int | None:
        """The position an image's last soft token must stay below (the smallest sliding
        window: see the module's docstring); None without sliding layers."""
        windows = [w for w in self.sliding_windows or () if w]
        return min(windows) if windows else None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Gemma3MMParams(Gemma3Params):
    # The vision tower's and projector's weights (multimodal/gemma3_vision.vision_params),
    # replicated, float32.
    vision: dict = weight()


def load_params(tensors: Mapping[str, np.ndarray], cfg: Gemma3MMConfig, dtype) -> Gemma3MMParams:
    text = gemma3.load_params(RenamedTensors(tensors, language_model_source), cfg, dtype)
    fields = {f.name: getattr(text, f.name) for f in dataclasses.fields(Gemma3Params)}
    return Gemma3MMParams(**fields, vision=vision_params(tensors, cfg.vision))


def _mask_positions(batch: MultimodalStepBatch) -> jax.Array:
    """[T] the position each token attends up to: a soft token's is its image's last soft
    token's (the end of its run of embedded tokens in its request), any other token's its
    own."""
    md, embedded = batch.attention, batch.embeds_mask
    T = embedded.shape[0]
    token = jnp.arange(T, dtype=jnp.int32)
    next_continues = jnp.concatenate([embedded[1:] & (md.seq_ids[1:] == md.seq_ids[:-1]),
                                      jnp.zeros(1, bool)])
    run_end = jax.lax.cummin(jnp.where(next_continues, T, token), reverse=True)
    return jnp.where(embedded, md.positions[jnp.minimum(run_end, T - 1)], md.positions)


def forward(params: Gemma3MMParams, kv_cache: KvCache, batch: StepBatch, cfg: Gemma3MMConfig):
    """Gemma 3's forward with the soft tokens' rows from the encoder and their attention
    widened to their image (a plain StepBatch: the text model alone)."""
    inv_freqs = {kind: jnp.asarray(cfg.layer_inv_freq(kind)) for kind in set(cfg.layer_types)}
    embed_scale = jnp.asarray(np.float32(cfg.hidden_size**0.5), params.embed.dtype)
    x = params.embed[batch.input_ids] * embed_scale
    mask_positions = None
    if isinstance(batch, MultimodalStepBatch):
        x = jnp.where(batch.embeds_mask[:, None], batch.embeds.astype(x.dtype), x)
        mask_positions = _mask_positions(batch)

    def step(layer, x, kv, kind, window):
        return gemma3._decoder_layer(layer, x, kv, batch, cfg, inv_freqs[kind], window,
                                     mask_positions)

    windows = [cfg.sliding_window(i) for i in range(cfg.num_layers)]
    kv_cache, x = run_layers(step, params.layers, kv_cache, x, cfg.layer_types, windows)
    return kv_cache, gemma_rms_norm(x, params.final_norm, cfg.rms_norm_eps)


# --- Multimodal inputs -------------------------------------------------------------------


def last_embedded_position(offset: int, length: int, is_embed) -> int:
    """The prompt position of a placeholder's last soft token."""
    if is_embed is None:
        return offset + length - 1
    return offset + int(np.flatnonzero(np.asarray(is_embed, bool))[-1])


def _check_items(cfg: Gemma3MMConfig, items: list[MultimodalItem]) -> None:
    limit = cfg.bidirectional_limit
    for item in items:
        end = last_embedded_position(item.offset, item.length, item.is_embed)
        if limit is not None and end >= limit:
            raise ValueError(image_too_late_message(end, limit))


def image_too_late_message(end: int, limit: int) -> str:
    return (f"xla-inference serves Gemma 3 images whose tokens end before position {limit} "
            f"(the sliding window); this prompt's image ends at {end}")


def encode(params: Gemma3MMParams, cfg: Gemma3MMConfig, item: MultimodalItem) -> jax.Array:
    """One item's embeddings [soft tokens, D]: each of its images (the image, then any
    pan-and-scan crops) through the one encoder program, in prompt order."""
    if item.modality != "image":
        raise ValueError(f"xla-inference serves Gemma 3 image inputs, not {item.modality}")
    v = cfg.vision
    pixels = np.asarray(item.data["pixel_values"])
    affine = item.data.get(PIXEL_AFFINE)
    if np.issubdtype(pixels.dtype, np.floating):
        affine = pixel_affine(v)  # the processor normalized them
        pixels = pixels.astype(np.float32, copy=False)
    elif pixels.dtype != np.uint8 or affine is None:  # raw pixels would be read as normalized
        raise ValueError(f"Gemma 3's encoder takes normalized float pixels, or uint8 pixels "
                         f"with the processor's normalization to apply ({PIXEL_AFFINE}); it "
                         f"got {pixels.dtype} pixels{'' if affine is not None else ' alone'}")
    # Raw pixels reach the program as uint8: a quarter of the bytes to copy, no host pass.
    pixels = pixels.reshape(-1, v.num_channels, v.image_size, v.image_size)
    program = encoder_program(v)
    crops = [program(params.vision, image, affine) for image in pixels]
    embeds = crops[0] if len(crops) == 1 else jnp.concatenate(crops)
    if embeds.shape[0] != item.num_embeds:
        raise ValueError(f"an image of {len(pixels)} crops gives {embeds.shape[0]} embeddings; "
                         f"its prompt holds {item.num_embeds} image tokens")
    return embeds


def warm_up(params: Gemma3MMParams, cfg: Gemma3MMConfig, grid, pixel_dtype) -> None:
    """Compile (and run once) the encoder's program for the pixels' dtype the processor
    delivers, on a blank image: uint8 for raw pixels (mm_device_do_normalize, on where our
    tower serves Gemma 3: plugin/platform.py), float32 for normalized ones (that setting
    off). A program of the other dtype compiles at its first image, should one ever come."""
    v = cfg.vision
    blank = np.zeros((v.num_channels, v.image_size, v.image_size), pixel_dtype)
    jax.block_until_ready(encoder_program(v)(params.vision, blank, pixel_affine(v)))


def fixed_grids(cfg: Gemma3MMConfig) -> list:
    return [(1, cfg.vision.image_size, cfg.vision.image_size)]


def rope_positions(cfg: Gemma3MMConfig, num_prompt_tokens: int,
                   items: list[MultimodalItem]) -> tuple[np.ndarray, int]:
    """Gemma 3 turns rope by each token's place in its sequence: the positions are the
    places (every row alike), the delta 0. Refuses an image its attention would get wrong."""
    _check_items(cfg, items)
    return np.broadcast_to(np.arange(num_prompt_tokens, dtype=np.int32),
                           (3, num_prompt_tokens)).copy(), 0


FAMILY = decoder_family(
    "gemma3_mm", ARCHITECTURES, Gemma3MMConfig, load_params=load_params, forward=forward,
    compute_logits=gemma3.compute_logits, kv_layers=gemma3.FAMILY.kv_layers,
    multimodal=MultimodalSupport(modalities=("image",), encode=encode,
                                 rope_positions=rope_positions, warm_up=warm_up,
                                 fixed_grids=fixed_grids, raw_pixels=True))
