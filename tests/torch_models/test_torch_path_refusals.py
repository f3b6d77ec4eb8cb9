"""What the torch path does not serve is refused by name, never served wrong: a layer kind
it does not lower (vLLM's fused MoE), a quantized checkpoint, and a torch op torchax has no
lowering for (named with the module that called it); each suggests --model-impl native
where a native family serves the architecture."""

import jax.numpy as jnp
import pytest
import torch

from tests.helpers import save_tiny_family, save_tiny_llama
from tests.torch_models.conftest import torch_engine, vllm_config

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_fused_moe_is_refused_naming_the_layer_and_the_native_family(tmp_path):
    from xla_inference.runner.build import Precision
    from xla_inference.torch_models.errors import TorchPathError
    from xla_inference.torch_models.loader import load

    model_dir = save_tiny_family(tmp_path / "moe", "qwen3_moe")
    with pytest.raises(TorchPathError, match=r"mixture-of-experts layers \(vLLM's fused MoE"
                       r".*--model-impl native serves Qwen3MoeForCausalLM"):
        load(vllm_config(model_dir, model_impl="vllm"), Precision.uniform(jnp.float32))


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
