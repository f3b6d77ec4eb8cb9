"""The Llama family (Llama 2/3/3.1/3.2, SmolLM2, TinyLlama) as a pure JAX function."""

import dataclasses
from collections.abc import Mapping

from xla_inference.models.decoder import DecoderConfig, decoder_family, decoder_fields


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    @classmethod
    def from_hf(cls, hf: Mapping) -> "LlamaConfig":
        if hf.get("mlp_bias"):
            raise ValueError("xla-inference does not support Llama checkpoints with mlp_bias")
        # HF Llama's attention_bias puts a bias on all four projections.
        bias = bool(hf.get("attention_bias", False))
        return cls(**decoder_fields(hf), qkv_bias=bias, o_bias=bias)


FAMILY = decoder_family("llama", ("LlamaForCausalLM",), LlamaConfig)
