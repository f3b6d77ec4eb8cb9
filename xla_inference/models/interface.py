"""The model interface: what the runner hands a model each step (StepBatch), what a model
tells the runner about its KV cache (KvLayer per layer), and the record each family
registers (ModelFamily). The runner reads models only through these."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from xla_inference.kernels.metadata import AttentionMetadata


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepBatch:
    """One scheduler step, padded to a token bucket T and a request bucket B (the step
    contract, docs/DESIGN.md)."""

    input_ids: jax.Array  # [T] int32, new tokens of all requests, concatenated
    attention: AttentionMetadata  # positions, pages and slots of those tokens
    logits_indices: jax.Array  # [B] int32, the token of each request that is sampled

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[-1]

    @property
    def num_seqs(self) -> int:
        return self.logits_indices.shape[-1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MultimodalStepBatch(StepBatch):
    """A step of a multimodal family (ModelFamily.multimodal): the rope positions it needs
    beyond the tokens' places in their sequences, and the encoder outputs that stand in
    for the placeholder tokens. Only multimodal families' programs take it, so text
    models' step programs stay as they are."""

    mrope_positions: jax.Array  # [3, T] int32, (time, height, width) rope position per token
    embeds: jax.Array  # [T, D], an encoder's output for each placeholder token (else zeros)
    embeds_mask: jax.Array  # [T] bool, the tokens whose input is their row of `embeds`


@dataclasses.dataclass
class MultimodalItem:
    """One image (or other input) of a request, as its prompt places it: its placeholder
    tokens are prompt[offset:offset + length], their embeddings the encoder's output."""

    identifier: str  # the encoder output's cache key (vLLM's mm hash)
    modality: str
    offset: int
    length: int
    data: Mapping[str, Any] | None  # the processor's arrays (numpy); None if already encoded
    # [length] bool: the placeholder tokens that take the encoder's rows, in order (Gemma 3's
    # placeholder also holds its image's begin/end tokens); None: every one of them.
    is_embed: Any = None

    @property
    def num_embeds(self) -> int:
        return self.length if self.is_embed is None else int(self.is_embed.sum())


# The key of an item's data that holds raw pixels' [2, channels] scale and shift, where vLLM
# leaves the processor's normalization to the model (mm_device_do_normalize).
PIXEL_AFFINE = "pixel_affine"


@dataclasses.dataclass(frozen=True)
class MultimodalSupport:
    """What a multimodal family adds to its record:
      modalities: what its encoders take ("image", ...)
      encode(params, cfg, item: MultimodalItem) -> embeddings [item.length, D]
      rope_positions(cfg, num_prompt_tokens, items) -> (positions [3, P] int, delta): each
        prompt token's rope positions, and what a later token's position (on every row)
        adds to its place in the sequence
      warm_up(params, cfg, grid, pixel_dtype): build the encoder's program for one image
        grid (the processor's (t, h, w) in patches) and pixels of one dtype (uint8 raw,
        float32 normalized), so that such images compile nothing
      fixed_grids(cfg) -> grids warmed up whatever sizes the user names (an encoder whose
        processor resizes every image to one size: Gemma 3); None: only the named ones
      raw_pixels: encode also takes raw uint8 pixels with the item's PIXEL_AFFINE (so vLLM
        may leave the processor's normalization to the model: mm_device_do_normalize)
    """

    modalities: tuple[str, ...]
    encode: Callable[..., Any]
    rope_positions: Callable[..., tuple[Any, int]]
    warm_up: Callable[..., None]
    fixed_grids: Callable[..., list] | None = None
    raw_pixels: bool = False


FULL, SLIDING, MLA = "full", "sliding_window", "mla"


@dataclasses.dataclass(frozen=True)
class KvLayer:
    """What one layer keeps in the paged KV cache, per token.

    kind: FULL (every position), SLIDING (only the last `sliding_window` positions are ever
    read, so vLLM may free older pages) or MLA (one latent vector per token, its own key
    and value). The engine allocates a [num_slots, num_kv_heads, head_size] K and V array
    (MLA: one array, [num_slots, 1, head_size]) per set of layers that share memory across
    vLLM's KV cache groups."""

    kind: str
    num_kv_heads: int
    head_size: int
    sliding_window: int | None = None

    def __post_init__(self):
        if self.kind not in (FULL, SLIDING, MLA):
            raise ValueError(f"unknown KV layer kind {self.kind!r}")
        if (self.kind == SLIDING) != (self.sliding_window is not None):
            raise ValueError("a sliding-window layer, and only one, has a sliding_window")

    @property
    def num_arrays(self) -> int:
        """Cache arrays per layer: K and V, or MLA's one latent."""
        return 1 if self.kind == MLA else 2


@dataclasses.dataclass(frozen=True)
class LoraSupport:
    """How LoRA adapters (lora/slots.py) reach a family whose params are not a decoder's
    (models/decoder.py): the torch path's fused projections (torch_models/lora.py).
      targets(params, cfg) -> ({PEFT module path: (out, in)}, the stacks' dtype)
      attach(params, stacks, token_slots [T], max_rank, cfg) -> what forward reads
      stack_sharding(param_shardings, module path) -> the NamedSharding its stacks follow
    """

    targets: Callable[..., Any]
    attach: Callable[..., Any]
    stack_sharding: Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family, registered under its HF architecture names (models/registry.py).

    Every function is pure over pytrees and the frozen config:
      config_from_hf(hf_config: Mapping) -> cfg
      load_params(tensors: Mapping[str, array], cfg, dtype) -> params (host numpy arrays)
      forward(params, kv_cache, batch: StepBatch, cfg) -> (kv_cache, hidden [T, D])
      compute_logits(params, hidden [B, D], cfg) -> logits [B, V] float32
      kv_layers(cfg) -> [KvLayer] per layer
    """

    name: str
    architectures: tuple[str, ...]
    config_from_hf: Callable[[Mapping], Any]
    load_params: Callable[..., Any]
    forward: Callable[..., Any]
    compute_logits: Callable[..., jax.Array]
    kv_layers: Callable[[Any], list[KvLayer]]
    multimodal: MultimodalSupport | None = None  # None: a text model
    lora: LoraSupport | None = None  # None: a decoder's (lora/slots.attach), if any
