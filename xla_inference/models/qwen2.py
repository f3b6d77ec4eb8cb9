"""The Qwen2 family (Qwen2, Qwen2.5): Llama with biases on the q, k and v projections."""

import dataclasses
from collections.abc import Mapping

from xla_inference.models.decoder import DecoderConfig, decoder_family, decoder_fields


# transformers' Qwen2/Qwen3(-MoE) configs' window size where use_sliding_window is set and
# sliding_window is not.
QWEN_DEFAULT_WINDOW = 4096


def qwen_window(hf: Mapping) -> int | None:
    """The window size, only where `use_sliding_window` is set (released Qwen2.5 checkpoints
    ship a `sliding_window` size with it unset)."""
    return hf.get("sliding_window", QWEN_DEFAULT_WINDOW) if hf.get("use_sliding_window") else None


def qwen_sliding_windows(hf: Mapping) -> tuple[int | None, ...] | None:
    """Per-layer windows as transformers' Qwen2/Qwen3 configs define them.

    The window applies only when `use_sliding_window` is set (released Qwen2.5 checkpoints
    ship a `sliding_window` size with it unset), and then to the layers `layer_types` marks
    "sliding_attention": by default layers i >= max_window_layers.
    """
    window = qwen_window(hf)
    if window is None:
        return None
    num_layers = hf["num_hidden_layers"]
    first_sliding = hf.get("max_window_layers", 28)
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers)]
    return tuple(window if kind == "sliding_attention" else None for kind in types)


@dataclasses.dataclass(frozen=True)
class Qwen2Config(DecoderConfig):
    @classmethod
    def from_hf(cls, hf: Mapping) -> "Qwen2Config":
        return cls(**decoder_fields(hf), qkv_bias=True, sliding_windows=qwen_sliding_windows(hf))


FAMILY = decoder_family("qwen2", ("Qwen2ForCausalLM",), Qwen2Config)
