"""Data parallel replicas at config check (plugin/platform._fold_data_parallel): a native
multimodal family (Llama4ForConditionalGeneration, the released Llama 4 checkpoints, and
the other towers' families) is refused there, before any weight loads, rather than at the
engine's build; Llama 4's text model (Llama4ForCausalLM), an MoE, is served with data
parallel; the MoE refusal for vLLM's PyTorch classes no longer lists Llama 4's multimodal
checkpoints among the families served."""

import types

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # plugin/platform.py imports vLLM


def _config(architecture: str, is_moe: bool, model_impl: str = "auto"):
    parallel = types.SimpleNamespace(data_parallel_size=1, data_parallel_external_lb=False,
                                     data_parallel_hybrid_lb=False)
    model = types.SimpleNamespace(is_moe=is_moe, model_impl=model_impl,
                                  architectures=[architecture])
    return types.SimpleNamespace(parallel_config=parallel, model_config=model,
                                 additional_config={"data_parallel_size": 2},
                                 scheduler_config=types.SimpleNamespace(scheduler_cls=None))


@pytest.mark.parametrize("architecture,is_moe", [("Llama4ForConditionalGeneration", True),
                                                 ("Gemma3ForConditionalGeneration", False),
                                                 ("Qwen2_5_VLForConditionalGeneration", False)])
def test_a_multimodal_family_is_refused_data_parallel_at_config_check(architecture, is_moe):
    from xla_inference.plugin.platform import _fold_data_parallel

    with pytest.raises(ValueError, match=f"multimodal models \\({architecture}\\) without data "
                                         "parallel.*--data-parallel-size 1"):
        _fold_data_parallel(_config(architecture, is_moe))


def test_llama4_text_model_is_served_data_parallel_and_the_moe_message_says_so():
    from xla_inference.plugin.platform import _fold_data_parallel

    config = _config("Llama4ForCausalLM", True)
    _fold_data_parallel(config)
    assert config.additional_config["xla_data_parallel_size"] == 2
    with pytest.raises(ValueError) as error:
        _fold_data_parallel(_config("Llama4ForConditionalGeneration", True, model_impl="vllm"))
    message = str(error.value)
    assert "Llama4ForCausalLM" in message
    assert "Llama4ForConditionalGeneration, are multimodal and served without data" in message
