"""The Mixtral family (MixtralForCausalLM): Mistral's attention (a sliding window on every
layer when the config sets one) and a mixture of experts on every layer, whose top-k
routing weights are always renormalised to sum to 1.

Checkpoints name the router `block_sparse_moe.gate` and the experts' gate, up and down
projections `block_sparse_moe.experts.{i}.w1`, `w3` and `w2`; transformers >= 5's fused
layout (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) loads too.
"""

import dataclasses
from collections.abc import Mapping

import numpy as np

from xla_inference.layers.moe import MoeConfig
from xla_inference.models import decoder
from xla_inference.models.decoder import decoder_family, load_moe_mlp, with_hf_defaults
from xla_inference.models.mistral import MistralConfig


# transformers' MixtralConfig defaults for keys that change numerics (not Mistral's: no
# window, rope base 1e6, eps 1e-5).
_HF_DEFAULTS = {"sliding_window": None, "num_key_value_heads": 8, "rope_theta": 1e6,
                "rms_norm_eps": 1e-5, "num_local_experts": 8, "num_experts_per_tok": 2}


@dataclasses.dataclass(frozen=True)
class MixtralConfig(MistralConfig):
    @classmethod
    def from_hf(cls, hf: Mapping) -> "MixtralConfig":
        hf = with_hf_defaults(hf, _HF_DEFAULTS)
        moe = MoeConfig(num_experts=hf["num_local_experts"],
                        num_experts_per_tok=hf["num_experts_per_tok"],
                        intermediate_size=hf["intermediate_size"], norm_topk_prob=True)
        return dataclasses.replace(super().from_hf(hf), moe=moe)


def load_params(tensors: Mapping[str, np.ndarray], cfg: MixtralConfig, dtype
                ) -> decoder.DecoderParams:
    def load_mlp(get, i: int):
        prefix = f"model.layers.{i}.block_sparse_moe."
        if f"model.layers.{i}.mlp.experts.gate_up_proj" in tensors:  # the fused layout's name
            prefix = f"model.layers.{i}.mlp."
        return load_moe_mlp(tensors, dtype, prefix, cfg.hidden_size, cfg.moe,
                            names=("w1", "w3", "w2"))

    return decoder.load_params(tensors, cfg, dtype, load_mlp)


FAMILY = decoder_family("mixtral", ("MixtralForCausalLM",), MixtralConfig, load_params=load_params)
