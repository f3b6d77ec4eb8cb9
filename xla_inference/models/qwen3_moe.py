"""The Qwen3-MoE family (Qwen3MoeForCausalLM, e.g. Qwen3-30B-A3B): Qwen3's attention (q/k
norms), and a mixture of experts in place of the MLP on the layers `decoder_sparse_step`
picks (every step-th) that `mlp_only_layers` does not exclude; the others keep a dense
MLP of `intermediate_size`. Whether the top-k routing weights are renormalised is the
config's `norm_topk_prob`.

A sliding window, when `use_sliding_window` is set, applies to every layer (as in
transformers' Qwen3-MoE, unlike dense Qwen3 where `max_window_layers` decides).
"""

import dataclasses
from collections.abc import Mapping

import numpy as np

from xla_inference.layers.moe import MoeConfig
from xla_inference.models import decoder
from xla_inference.models.qwen2 import qwen_window
from xla_inference.models.decoder import (DecoderConfig, decoder_family, decoder_fields,
                                          load_gated_mlp, load_moe_mlp)


def moe_layers(hf: Mapping) -> tuple[bool, ...]:
    """Which layers have experts, as transformers' Qwen3MoeDecoderLayer decides."""
    num_experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
    return tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0
                 for i in range(hf["num_hidden_layers"]))


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig(DecoderConfig):
    moe_layers: tuple[bool, ...] = ()  # per layer: experts (True) or the dense MLP

    @classmethod
    def from_hf(cls, hf: Mapping) -> "Qwen3MoeConfig":
        bias = bool(hf.get("attention_bias", False))
        window = qwen_window(hf)
        moe = MoeConfig(
            # transformers >= 5 writes num_local_experts; released configs say num_experts.
            num_experts=hf.get("num_experts") or hf.get("num_local_experts"),
            num_experts_per_tok=hf["num_experts_per_tok"],
            intermediate_size=hf["moe_intermediate_size"],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        )
        return cls(**decoder_fields(hf), qkv_bias=bias, o_bias=bias, qk_norm=True,
                   sliding_windows=(window,) * hf["num_hidden_layers"] if window else None,
                   moe=moe, moe_layers=moe_layers(hf))


def load_params(tensors: Mapping[str, np.ndarray], cfg: Qwen3MoeConfig, dtype
                ) -> decoder.DecoderParams:
    def load_mlp(get, i: int):
        prefix = f"model.layers.{i}.mlp."
        if cfg.moe_layers[i]:
            return load_moe_mlp(tensors, dtype, prefix, cfg.hidden_size, cfg.moe)
        return load_gated_mlp(get, prefix, cfg.hidden_size, cfg.intermediate_size)

    return decoder.load_params(tensors, cfg, dtype, load_mlp)


FAMILY = decoder_family("qwen3_moe", ("Qwen3MoeForCausalLM",), Qwen3MoeConfig,
                        load_params=load_params)
