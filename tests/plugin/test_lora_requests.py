"""A request asking for prompt_logprobs with an adapter that adapts lm_head is refused with
vLLM's validation error (a 400 through the server): prompt logprobs are scored with the
base LM head (plugin/lora_requests.py). The check wraps InputProcessor.process_inputs,
the first place that sees both the sampling parameters and the adapter."""

import pytest

from tests.helpers import save_tiny_llama
from tests.lora.lora_helpers import save_adapter

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # imports vLLM


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_requests")
    model_dir = save_tiny_llama(root / "model")
    return {name: save_adapter(model_dir, root / name, seed=i, r=4, target_modules=targets)
            for i, (name, targets) in enumerate([("head", ["lm_head", "q_proj"]),
                                                  ("attn", ["q_proj", "v_proj"])])}


class _Processor:
    """Stands in for vLLM's InputProcessor: records what reached it."""

    def process_inputs(self, request_id, prompt, params, supported_tasks, arrival_time=None,
                       lora_request=None, **kwargs):
        return request_id


def test_prompt_logprobs_with_an_lm_head_adapter_are_refused(adapters):
    from vllm.exceptions import VLLMValidationError
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import SamplingParams

    from xla_inference.plugin.lora_requests import check_requests_lora

    check_requests_lora(_Processor)
    check_requests_lora(_Processor)  # idempotent: wrapped once
    assert _Processor.process_inputs.__wrapped__.__name__ == "process_inputs"
    assert not hasattr(_Processor.process_inputs.__wrapped__, "__wrapped__")
    head = LoRARequest("head", 1, str(adapters["head"]))
    attn = LoRARequest("attn", 2, str(adapters["attn"]))
    asking, plain = SamplingParams(prompt_logprobs=2), SamplingParams(logprobs=2)
    processor = _Processor()
    with pytest.raises(VLLMValidationError, match="prompt_logprobs with LoRA adapter 'head'"):
        processor.process_inputs("r", [1], asking, (), lora_request=head)
    with pytest.raises(VLLMValidationError, match="adapts lm_head"):  # positional, as vLLM may
        processor.process_inputs("r", [1], asking, (), None, head)
    with pytest.raises(VLLMValidationError, match="adapts lm_head"):  # all keywords
        processor.process_inputs(request_id="r", prompt=[1], params=asking,
                                 supported_tasks=(), lora_request=head)
    assert processor.process_inputs("r", [1], plain, (), lora_request=head) == "r"
    assert processor.process_inputs("r", [1], asking, (), lora_request=attn) == "r"
    assert processor.process_inputs("r", [1], asking, ()) == "r"


def test_the_check_is_installed_with_lora(tmp_path):
    """check_and_update_config wraps vLLM's InputProcessor when LoRA is enabled."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.input_processor import InputProcessor

    model_dir = save_tiny_llama(tmp_path / "llama")
    EngineArgs(model=str(model_dir), max_model_len=128, enable_lora=True).create_engine_config()
    assert getattr(InputProcessor.process_inputs, "_xla_inference", False)
