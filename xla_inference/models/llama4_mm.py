"""Llama 4 with images (Llama4ForConditionalGeneration: Llama 4 Scout and Maverick): the
Llama 4 text decoder (models/llama4.py) fed the vision tower's embeddings
(multimodal/llama4_vision.py) at each image's patch tokens.

The processor cuts an image into tiles (up to its max_patches, as a grid of rows x
columns) and, when there are several, adds a global tile of the whole image. Its prompt
text is `<|image_start|>`, each grid row's tiles (`tokens_per_tile` `<|patch|>` tokens
each, `<|tile_x_separator|>` between them, `<|tile_y_separator|>` after the row), then
`<|image|>` and the global tile's (or the only tile's) patch tokens, `<|image_end|>`.
vLLM's placeholder spans all of it; only the `<|patch|>` tokens take encoder rows
(MultimodalItem.is_embed), the tiles' rows in the processor's order. Attention stays
causal (as transformers' and vLLM's Llama 4), so an image may be cut across
chunked-prefill steps. Rope turns by each token's place in its sequence.
"""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.kernels.metadata import KvCache
from xla_inference.loading.checkpoint import RenamedTensors, language_model_source
from xla_inference.models import llama4
from xla_inference.models.decoder import DecoderParams, decoder_family
from xla_inference.models.interface import (MultimodalItem, MultimodalStepBatch,
                                            MultimodalSupport, StepBatch)
from xla_inference.models.llama4 import Llama4Config
from xla_inference.multimodal.llama4_vision import (Llama4VisionConfig, encoder_program,
                                                    vision_params)
from xla_inference.parallel.axes import weight

ARCHITECTURES = ("Llama4ForConditionalGeneration",)


@dataclasses.dataclass(frozen=True)
class Llama4MMConfig(Llama4Config):
    vision: Llama4VisionConfig | None = None
    image_token_id: int = 200_092  # <|patch|>: the tokens that take encoder rows

    @classmethod
    def from_hf(cls, hf: Mapping) -> "Llama4MMConfig":
        text = dict(hf["text_config"])
        text["tie_word_embeddings"] = hf.get("tie_word_embeddings",
                                             text.get("tie_word_embeddings", False))
        base = Llama4Config.from_hf(text)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Llama4Config)}
        image_token = hf.get("image_token_index", hf.get("image_token_id", 200_092))
        return cls(**fields, vision=Llama4VisionConfig.from_hf(hf), image_token_id=int(image_token))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Llama4MMParams(DecoderParams):
    # The tower's, adapter's and projector's weights (multimodal/llama4_vision.vision_params),
    # replicated, float32.
    vision: dict = weight()


def load_params(tensors: Mapping[str, np.ndarray], cfg: Llama4MMConfig, dtype) -> Llama4MMParams:
    text = llama4.load_params(RenamedTensors(tensors, language_model_source), cfg, dtype)
    fields = {f.name: getattr(text, f.name) for f in dataclasses.fields(DecoderParams)}
    return Llama4MMParams(**fields, vision=vision_params(tensors, cfg.vision))


def forward(params: Llama4MMParams, kv_cache: KvCache, batch: StepBatch, cfg: Llama4MMConfig):
    """Llama 4's forward with the patch tokens' rows from the encoder (a plain StepBatch:
    the text model alone)."""
    x = params.embed[batch.input_ids]
    if isinstance(batch, MultimodalStepBatch):
        x = jnp.where(batch.embeds_mask[:, None], batch.embeds.astype(x.dtype), x)
    return llama4.forward_inputs(params, kv_cache, batch, cfg, x)


# --- Multimodal inputs -------------------------------------------------------------------


def encode(params: Llama4MMParams, cfg: Llama4MMConfig, item: MultimodalItem) -> np.ndarray:
    """One image's embeddings [patch tokens, D]: each of its tiles (the grid's, row-major,
    then the global tile) through the one encoder program, in prompt order."""
    if item.modality != "image":
        raise ValueError(f"xla-inference serves Llama 4 image inputs, not {item.modality}")
    v = cfg.vision
    pixels = np.asarray(item.data["pixel_values"])
    if not np.issubdtype(pixels.dtype, np.floating):  # raw pixels would be read as normalized
        raise ValueError(f"Llama 4's encoder takes the processor's normalized float pixels; it "
                         f"got {pixels.dtype} pixels")
    tiles = pixels.astype(np.float32, copy=False).reshape(-1, v.num_channels, v.image_size,
                                                          v.image_size)
    program = encoder_program(v)
    # Joined on the host (the encoder cache keeps host arrays): a device concatenate of a
    # new tile count would compile a program of its own.
    embeds = np.concatenate([np.asarray(program(params.vision, tile)) for tile in tiles])
    if embeds.shape[0] != item.num_embeds:
        raise ValueError(f"an image of {len(tiles)} tiles gives {embeds.shape[0]} embeddings; "
                         f"its prompt holds {item.num_embeds} image tokens")
    return embeds


def warm_up(params: Llama4MMParams, cfg: Llama4MMConfig, grid, pixel_dtype) -> None:
    """Compile (and run once) the encoder's program on a blank tile. Pixels come normalized
    (float; the platform turns vLLM's mm_device_do_normalize off for this family)."""
    v = cfg.vision
    blank = np.zeros((v.num_channels, v.image_size, v.image_size), np.float32)
    jax.block_until_ready(encoder_program(v)(params.vision, blank))


def fixed_grids(cfg: Llama4MMConfig) -> list:
    return [(1, cfg.vision.image_size, cfg.vision.image_size)]


def rope_positions(cfg: Llama4MMConfig, num_prompt_tokens: int,
                   items: list[MultimodalItem]) -> tuple[np.ndarray, int]:
    """Llama 4 turns rope by each token's place in its sequence: the positions are the
    places (every row alike), the delta 0."""
    return np.broadcast_to(np.arange(num_prompt_tokens, dtype=np.int32),
                           (3, num_prompt_tokens)).copy(), 0


FAMILY = decoder_family(
    "llama4_mm", ARCHITECTURES, Llama4MMConfig, load_params=load_params, forward=forward,
    multimodal=MultimodalSupport(modalities=("image",), encode=encode,
                                 rope_positions=rope_positions, warm_up=warm_up,
                                 fixed_grids=fixed_grids, raw_pixels=False))
