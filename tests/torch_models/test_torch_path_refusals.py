"""What the torch path does not serve is refused by name, never served wrong: the routing
variants of vLLM's fused MoE it does not lower (grouped top-k over softmax scores or
without a correction bias, sigmoid scoring without one, router weights on the inputs), a
quantized checkpoint, and a torch op torchax has no lowering for (named with the module
that called it); each suggests --model-impl native where a native family serves the
architecture."""

import jax.numpy as jnp
import pytest
import torch

from tests.helpers import save_tiny_family, save_tiny_llama
from tests.torch_models.conftest import torch_engine, vllm_config

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def _route_by_softmax(runner):
    runner.router.scoring_func = "softmax"


def _drop_the_bias(runner):
    runner.router.e_score_correction_bias = None


def _score_by_sigmoid(runner):
    runner.router.scoring_func = "sigmoid"


def _weigh_the_inputs(runner):
    runner.routed_experts.apply_router_weight_on_input = True


# (checkpoint, change to its last MoE runner, what the refusal names, its native hint)
VARIANTS = {
    "grouped_softmax": ("glm4_moe", _route_by_softmax,
                        "grouped top-k routing over softmax scores", "has no native family"),
    "grouped_without_bias": ("glm4_moe", _drop_the_bias, "grouped top-k routing over sigmoid "
                             "scores without a score correction bias", "has no native family"),
    "sigmoid_without_bias": ("qwen3_moe", _score_by_sigmoid, "sigmoid scoring of the router "
                             "without a score correction bias",
                             "--model-impl native serves Qwen3MoeForCausalLM"),
    "weights_on_inputs": ("qwen3_moe", _weigh_the_inputs,
                          "router weights applied to the expert inputs",
                          "--model-impl native serves Qwen3MoeForCausalLM"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_routing_variant_is_refused_before_the_module_changes(tmp_path, variant):
    """GLM-4.5's and Qwen3-MoE's runners, the last made to route otherwise: refused by name
    with the native hint, and no runner is changed (no half-lowered module)."""
    from tests.torch_models.conftest import save_tiny_moe
    from xla_inference.runner.build import Precision
    from xla_inference.torch_models import loader, moe
    from xla_inference.torch_models.errors import TorchPathError

    checkpoint, change, named, hint = VARIANTS[variant]
    model_dir = (save_tiny_family(tmp_path / "moe", checkpoint) if checkpoint == "qwen3_moe"
                 else save_tiny_moe(tmp_path, checkpoint))
    config = vllm_config(model_dir, model_impl="vllm")
    module = loader.build_module(config)
    runners = [runner for _, runner in moe.moe_runners(module)]
    change(runners[-1])
    with pytest.raises(TorchPathError, match=rf"does not serve {named} in vLLM's fused MoE "
                       rf"\(model\.layers\.1\.mlp\.experts: MoERunner\) yet; .*{hint}"):
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
