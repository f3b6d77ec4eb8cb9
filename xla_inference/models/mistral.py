"""The Mistral family: Llama with a sliding attention window on every layer (when the
config sets one; Mistral 7B v0.1 uses 4096, later versions none)."""

import dataclasses
from collections.abc import Mapping

from xla_inference.models.decoder import (DecoderConfig, decoder_family, decoder_fields,
                                          with_hf_defaults)

# transformers' MistralConfig defaults for keys that change numerics.
_HF_DEFAULTS = {"sliding_window": 4096, "num_key_value_heads": 8, "rope_theta": 10_000.0,
                "rms_norm_eps": 1e-6}


@dataclasses.dataclass(frozen=True)
class MistralConfig(DecoderConfig):
    @classmethod
    def from_hf(cls, hf: Mapping) -> "MistralConfig":
        hf = with_hf_defaults(hf, _HF_DEFAULTS)
        window = hf.get("sliding_window")
        windows = (window,) * hf["num_hidden_layers"] if window else None
        return cls(**decoder_fields(hf), sliding_windows=windows)


FAMILY = decoder_family("mistral", ("MistralForCausalLM",), MistralConfig)
