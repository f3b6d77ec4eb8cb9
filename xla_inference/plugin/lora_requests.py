"""A request's LoRA adapter is loaded before the request reaches the engine, so an adapter
we refuse (DoRA, a module the model lacks, rank above --max-lora-rank, ...) fails that
request with vLLM's validation error, naming the adapter and the reason, in the caller's
thread: vllm.LLM raises it from generate (and aborts the call's other requests, as it does
for any invalid request), the server answers a 400. Left to the engine, the adapter would
be loaded inside the step (plugin/model_runner._update_states), where a refusal kills the
engine core and every request with it.

The adapter is loaded with the engine's own add_lora (a utility call: its failure comes
back to the caller and the engine core serves on), once per (adapter id, path) and front
end: the worker keeps it, and reloads it from its path if it is evicted meanwhile."""

import functools
import sys

_ENGINES = (("vllm.v1.engine.llm_engine", "LLMEngine"), ("vllm.v1.engine.async_llm", "AsyncLLM"))


def _lora_request_of(args: tuple, kwargs: dict):
    """add_request(request_id, prompt, params, arrival_time=None, lora_request=None, ...):
    the adapter, by keyword or position (args after params)."""
    if "lora_request" in kwargs:
        return kwargs["lora_request"]
    return args[1] if len(args) >= 2 else None


def _adapter_key(lora_request) -> tuple:
    return lora_request.lora_int_id, lora_request.lora_path


def _refusal(lora_request, error: Exception):
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(
        f"LoRA adapter {lora_request.lora_name!r} (id {lora_request.lora_int_id}, "
        f"{lora_request.lora_path}) cannot be served: {error}", parameter="lora_request",
        value=lora_request.lora_name)


def _loaded(engine) -> set:
    """The (adapter id, path) pairs this front end has seen loaded."""
    if "_xla_inference_loras" not in engine.__dict__:
        engine._xla_inference_loras = set()
    return engine._xla_inference_loras


def _wrap_sync(engine_cls) -> None:
    original = engine_cls.add_request

    @functools.wraps(original)
    def add_request(self, request_id, prompt, params, *args, **kwargs):
        lora_request = _lora_request_of(args, kwargs)
        if lora_request is not None and _adapter_key(lora_request) not in _loaded(self):
            try:
                self.add_lora(lora_request)
            except Exception as error:  # the engine's refusal, as the utility call returns it
                raise _refusal(lora_request, error) from error
            _loaded(self).add(_adapter_key(lora_request))
        return original(self, request_id, prompt, params, *args, **kwargs)

    add_request._xla_inference = True
    engine_cls.add_request = add_request


def _wrap_async(engine_cls) -> None:
    original = engine_cls.add_request

    @functools.wraps(original)
    async def add_request(self, request_id, prompt, params, *args, **kwargs):
        lora_request = _lora_request_of(args, kwargs)
        if lora_request is not None and _adapter_key(lora_request) not in _loaded(self):
            try:
                await self.add_lora(lora_request)
            except Exception as error:
                raise _refusal(lora_request, error) from error
            _loaded(self).add(_adapter_key(lora_request))
        return await original(self, request_id, prompt, params, *args, **kwargs)

    add_request._xla_inference = True
    engine_cls.add_request = add_request


def load_adapters_before_requests() -> None:
    """Wrap the front ends' add_request once (idempotent: the config checks run more than
    once). vllm.LLM's engine always; the server's AsyncLLM where it is imported (the
    server imports it before its config is checked; importing it here would slow the
    engine core's start for nothing)."""
    import vllm.v1.engine.llm_engine  # noqa: F401 (what vllm.LLM drives)

    for module, name in _ENGINES:
        engine_cls = getattr(sys.modules.get(module), name, None)
        if engine_cls is None or getattr(engine_cls.add_request, "_xla_inference", False):
            continue
        if name == "AsyncLLM":
            _wrap_async(engine_cls)
        else:
            _wrap_sync(engine_cls)
