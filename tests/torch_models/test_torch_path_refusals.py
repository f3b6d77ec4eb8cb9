"""What the torch path does not serve is refused by name, never served wrong: the routing
variants of vLLM's fused MoE it does not lower (grouped top-k, sigmoid scoring, a score
correction bias, a routed scaling factor, router weights on the inputs), a quantized
checkpoint, and a torch op torchax has no lowering for (named with the module that called
it); each suggests --model-impl native where a native family serves the architecture."""

import jax.numpy as jnp
import pytest
import torch

from tests.helpers import save_tiny_family, save_tiny_llama
from tests.torch_models.conftest import torch_engine, vllm_config

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_grouped_sigmoid_routing_is_refused_by_name(tmp_path):
    """GLM-4.5's MoE (DeepSeek-V3's routing): every variant it uses is named."""
    import transformers

    from tests.helpers import save_tiny_model
    from xla_inference.runner.build import Precision
    from xla_inference.torch_models.errors import TorchPathError
    from xla_inference.torch_models.loader import load

    config = transformers.Glm4MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        moe_intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5)
    model_dir = save_tiny_model(tmp_path / "glm4_moe", config)
    with pytest.raises(TorchPathError, match=(
            r"Glm4MoeForCausalLM: .* does not serve grouped top-k routing .*, sigmoid scoring "
            r"of the router, routing with a score correction bias .*, a routed scaling factor "
            r"in vLLM's fused MoE \(model\.layers\.1\.mlp\.experts")):
        load(vllm_config(model_dir, model_impl="vllm"), Precision.uniform(jnp.float32))


@pytest.mark.parametrize("change, named", [
    (lambda runner: setattr(runner.router, "scoring_func", "sigmoid"),
     "sigmoid scoring of the router"),
    (lambda runner: setattr(runner.routed_experts, "apply_router_weight_on_input", True),
     "router weights applied to the expert inputs"),
], ids=["sigmoid_scoring", "weights_on_inputs"])
def test_a_variant_of_a_served_moe_is_refused_before_the_module_changes(tmp_path, change,
                                                                        named):
    """Qwen3-MoE's runners, each made to route otherwise: refused by name, naming the native
    family, and no runner is changed (no half-lowered module)."""
    from xla_inference.runner.build import Precision
    from xla_inference.torch_models import loader, moe
    from xla_inference.torch_models.errors import TorchPathError

    config = vllm_config(save_tiny_family(tmp_path / "moe", "qwen3_moe"), model_impl="vllm")
    module = loader.build_module(config)
    runners = [runner for _, runner in moe.moe_runners(module)]
    change(runners[-1])
    with pytest.raises(TorchPathError, match=rf"{named} in vLLM's fused MoE \(model\.layers\.1"
                       r".*--model-impl native serves Qwen3MoeForCausalLM"):
        loader.lower(module, config, Precision.uniform(jnp.float32))
    for runner in runners:
        assert "forward" not in vars(runner) and hasattr(runner.routed_experts, "w13_weight")


def _segment_sum(x):
    """An op torchax 0.0.13 has no lowering for."""
    return torch.segment_reduce(x, "sum", lengths=torch.tensor([x.shape[-1]]), axis=-1)


def test_an_op_torchax_cannot_lower_is_named_with_its_module(tmp_path, monkeypatch):
    from vllm.model_executor.layers.activation import SiluAndMul

    from xla_inference.torch_models.errors import TorchPathError

    model_dir = save_tiny_llama(tmp_path / "llama")
    monkeypatch.setattr(SiluAndMul, "forward_native", lambda self, x: _segment_sum(x))
    engine = torch_engine(model_dir, model_impl="vllm")
    with pytest.raises(TorchPathError, match=r"in model\.layers\.0\.mlp\.act_fn \(SiluAndMul\): "
                       r".*aten::segment_reduce.*--model-impl native serves LlamaForCausalLM"):
        engine.warm_up()
