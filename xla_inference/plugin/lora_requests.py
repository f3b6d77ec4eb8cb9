"""Per-request refusals that depend on the request's LoRA adapter. vLLM's
Platform.validate_request sees the sampling parameters but not the adapter, so our check
wraps the front-end's InputProcessor.process_inputs (which sees both) and raises vLLM's
validation error there: the server answers it with a 400 and the message."""

import functools

from xla_inference.lora.peft import adapter_adapts_lm_head


@functools.lru_cache(maxsize=256)
def _adapts_lm_head(path: str) -> bool:
    return adapter_adapts_lm_head(path)


def refuse_prompt_logprobs_with_lm_head_adapter(params, lora_request) -> None:
    """Prompt logprobs are scored with the base model's LM head (runner/engine.score_tokens):
    with an adapter on lm_head they would be the base model's, so the request is refused."""
    from vllm.exceptions import VLLMValidationError
    from vllm.lora.utils import get_adapter_absolute_path

    if lora_request is None or getattr(params, "prompt_logprobs", None) is None:
        return
    if _adapts_lm_head(get_adapter_absolute_path(lora_request.lora_path)):
        raise VLLMValidationError(
            f"xla-inference does not return prompt_logprobs with LoRA adapter "
            f"{lora_request.lora_name!r} yet: it adapts lm_head, and prompt logprobs are "
            "scored with the base model's LM head", parameter="prompt_logprobs")


def check_requests_lora(input_processor_cls) -> None:
    """Wrap process_inputs once (idempotent: the config checks run more than once)."""
    original = input_processor_cls.process_inputs
    if getattr(original, "_xla_inference", False):
        return

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        lora_request = kwargs.get("lora_request")
        if lora_request is None and len(args) >= 3:  # supported_tasks, arrival_time, lora
            lora_request = args[2]
        refuse_prompt_logprobs_with_lm_head_adapter(params, lora_request)
        return original(self, request_id, prompt, params, *args, **kwargs)

    process_inputs._xla_inference = True
    input_processor_cls.process_inputs = process_inputs
