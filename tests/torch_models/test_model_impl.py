"""--model-impl (plugin/worker.model_implementation): auto serves our JAX family where we
have one and vLLM's PyTorch class otherwise; native and vllm force theirs; anything else,
or native without a family, is refused by name."""

from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.vllm


def _config(impl: str, architecture: str):
    return SimpleNamespace(model_impl=impl, architectures=[architecture])


@pytest.mark.parametrize("impl, architecture, chosen", [
    ("auto", "LlamaForCausalLM", "native"), ("auto", "Qwen3MoeForCausalLM", "native"),
    ("auto", "Phi3ForCausalLM", "vllm"), ("auto", "GraniteForCausalLM", "vllm"),
    ("vllm", "LlamaForCausalLM", "vllm"), ("native", "Qwen3ForCausalLM", "native"),
])
def test_the_implementation_chosen(impl, architecture, chosen):
    from xla_inference.plugin.worker import model_implementation

    assert model_implementation(_config(impl, architecture)) == chosen


def test_native_without_a_family_and_unknown_choices_are_refused():
    from xla_inference.plugin.worker import model_implementation

    with pytest.raises(ValueError, match=r"no JAX family for \['Phi3ForCausalLM'\].*"
                                         r"--model-impl auto or vllm"):
        model_implementation(_config("native", "Phi3ForCausalLM"))
    with pytest.raises(ValueError, match="auto, native or vllm, not 'transformers'"):
        model_implementation(_config("transformers", "LlamaForCausalLM"))
