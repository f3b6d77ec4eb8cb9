"""LoRA adapters on the MoE families (Qwen3-MoE, Mixtral): every layer's attention
projections (and a dense MLP layer's gate/up/down) take each token's adapter, within 2e-4
of transformers+peft for base and three adapters of different ranks mixed in one step; an
adapter on the experts (peft's target_parameters on the fused gate_up_proj / down_proj) is
refused with the field named."""

import pytest

from tests.helpers import save_tiny_family
from tests.lora.lora_helpers import save_adapter
from tests.lora.test_lora_engine import _assert_mixed_adapters_match_peft, lora_engine
from xla_inference.lora.peft import LoraError, load_adapter

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MOE_ADAPTERS = [("m4", dict(r=4, lora_alpha=8, target_modules=ATTENTION)),
                ("m8", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"])),
                ("m16", dict(r=16, lora_alpha=32, rank_pattern={"o_proj": 6},
                             target_modules=ATTENTION))]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_attention_adapters_on_moe_match_peft(tmp_path, family):
    model_dir = save_tiny_family(tmp_path / "model", family)
    adapters = {name: save_adapter(model_dir, tmp_path / name, seed=20 + i, **fields)
                for i, (name, fields) in enumerate(MOE_ADAPTERS)}
    engine = lora_engine(model_dir)
    assert any(hasattr(layer.mlp, "router") for layer in engine.params.layers)  # MoE layers
    _assert_mixed_adapters_match_peft(engine, model_dir, adapters)


def test_expert_adapters_refused_by_name(tmp_path):
    model_dir = save_tiny_family(tmp_path / "model", "qwen3_moe")
    # peft moves gate/up/down of a fused-experts model to target_parameters (the experts)
    experts = save_adapter(model_dir, tmp_path / "experts", seed=3, r=4,
                           target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
    shapes = _targets(model_dir)
    assert "model.layers.0.mlp.gate_proj" in shapes  # the dense layer's MLP is a target
    assert not any("layers.1.mlp" in module for module in shapes)  # the experts are not
    with pytest.raises(LoraError, match="target_parameters.*MoE expert adapters are not served"):
        load_adapter(experts, shapes, 16)


def _targets(model_dir):
    import jax.numpy as jnp

    from xla_inference.lora.slots import decoder_targets
    from xla_inference.runner.build import Precision, load

    return decoder_targets(load(model_dir, Precision.uniform(jnp.float32)).params)
