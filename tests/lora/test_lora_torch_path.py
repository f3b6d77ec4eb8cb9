"""LoRA on the torch path (--model-impl vllm): vLLM's Llama class, its q/k/v and gate/up
fused into one linear layer each, with PEFT adapters of three ranks mixed in one step
against transformers+peft, and the fused layers' members found as the stacks name them."""

import pytest

from tests.lora.lora_helpers import save_adapters
from tests.lora.test_lora_engine import _assert_mixed_adapters_match_peft
from tests.torch_models.conftest import vllm_config

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def torch_lora_engine(model_dir, mesh=None, max_loras=3):
    import jax.numpy as jnp

    from tests.helpers import ENGINE_BLOCK
    from xla_inference.runner.build import Precision, build_engine
    from xla_inference.runner.engine import EngineConfig
    from xla_inference.torch_models.loader import load

    f32 = jnp.dtype(jnp.float32)
    model = load(vllm_config(model_dir, model_impl="vllm"), Precision(f32, f32, f32))
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=64,
                        max_num_seqs=8, max_model_len=128)
    return build_engine(model, ecfg, mesh=mesh,
                        lora=dict(max_loras=max_loras, max_rank=16, max_cpu_loras=4))


@pytest.fixture(scope="module")
def llama_and_adapters(tmp_path_factory):
    from tests.helpers import save_tiny_llama

    root = tmp_path_factory.mktemp("torch_lora")
    model_dir = save_tiny_llama(root / "model")
    return model_dir, save_adapters(model_dir, root)


def test_mixed_adapters_match_peft(llama_and_adapters):
    """The fused layers' members named as PEFT names them; base and three adapters in the
    same steps within 2e-4 of transformers+peft."""
    model_dir, adapters = llama_and_adapters
    engine = torch_lora_engine(model_dir)
    assert engine.model.name == "vllm:LlamaForCausalLM"
    layer0 = sorted(m.rpartition(".")[2] for m in engine.lora.module_shapes if ".layers.0." in m)
    assert layer0 == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    _assert_mixed_adapters_match_peft(engine, model_dir, adapters)
