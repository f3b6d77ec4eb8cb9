"""The Qwen3 family (dense): RMSNorm over each head of q and k before rope, no biases
(unless `attention_bias`), a head_dim of its own (N * H need not equal D)."""

import dataclasses
from collections.abc import Mapping

from xla_inference.models.decoder import DecoderConfig, decoder_family, decoder_fields
from xla_inference.models.qwen2 import qwen_sliding_windows


@dataclasses.dataclass(frozen=True)
class Qwen3Config(DecoderConfig):
    @classmethod
    def from_hf(cls, hf: Mapping) -> "Qwen3Config":
        bias = bool(hf.get("attention_bias", False))
        return cls(**decoder_fields(hf), qkv_bias=bias, o_bias=bias, qk_norm=True,
                   sliding_windows=qwen_sliding_windows(hf))


FAMILY = decoder_family("qwen3", ("Qwen3ForCausalLM",), Qwen3Config)
