"""A request's LoRA adapter is loaded before the request reaches the engine, so an adapter
we refuse (DoRA, a module the model lacks, rank above --max-lora-rank, ...) fails that
request with vLLM's validation error, naming the adapter and the reason, in the caller's
thread: vllm.LLM raises it from generate (and aborts the call's other requests, as it does
for any invalid request), the server answers a 400. Left to the engine, the adapter would
be loaded inside the step (plugin/model_runner._update_states), where a refusal kills the
engine core and every request with it.

The adapter is loaded with the engine's own add_lora (a utility call: its failure comes
back to the caller and the engine core serves on), once per (adapter id, path) and front
end: the worker keeps it, and reloads it from its path if it is evicted meanwhile. The
front end forgets an adapter when it is removed (remove_lora), and a load_inplace request
loads it again each time, so a stale entry never skips the early load.

Only a refusal of the adapter becomes the validation error: the worker marks it with
ADAPTER_REFUSED (plugin/worker.add_lora), since across processes a utility call's failure
arrives as a plain Exception carrying only the message. Any other failure (the engine
core dead, a transport error) propagates unchanged."""

import functools
import sys

_ENGINES = (("vllm.v1.engine.llm_engine", "LLMEngine"), ("vllm.v1.engine.async_llm", "AsyncLLM"))

# Put by the worker before a refusal's message; what follows it is the reason.
ADAPTER_REFUSED = "adapter refused: "


def _lora_request_of(args: tuple, kwargs: dict):
    """add_request(request_id, prompt, params, arrival_time=None, lora_request=None, ...):
    the adapter, by keyword or position (args after params)."""
    if "lora_request" in kwargs:
        return kwargs["lora_request"]
    return args[1] if len(args) >= 2 else None


def _adapter_key(lora_request) -> tuple:
    return lora_request.lora_int_id, lora_request.lora_path


def _refusal(lora_request, error: Exception):
    """vLLM's validation error for an adapter the worker refused, or None for any other
    failure (the caller re-raises that one as it came)."""
    message = str(error)
    if ADAPTER_REFUSED not in message:
        return None
    from vllm.exceptions import VLLMValidationError

    reason = message.split(ADAPTER_REFUSED, 1)[1]
    return VLLMValidationError(
        f"LoRA adapter {lora_request.lora_name!r} (id {lora_request.lora_int_id}, "
        f"{lora_request.lora_path}) cannot be served: {reason}", parameter="lora_request",
        value=lora_request.lora_name)


def _loaded(engine) -> set:
    """The (adapter id, path) pairs this front end has seen loaded."""
    if "_xla_inference_loras" not in engine.__dict__:
        engine._xla_inference_loras = set()
    return engine._xla_inference_loras


def _needs_loading(engine, lora_request) -> bool:
    """Not yet loaded through this front end, or load_inplace (the adapter's files may
    have changed: the worker reads them again, and so must the early check)."""
    if lora_request is None:
        return False
    return lora_request.load_inplace or _adapter_key(lora_request) not in _loaded(engine)


def _forget(engine, lora_id: int) -> None:
    loaded = _loaded(engine)
    loaded.difference_update({key for key in loaded if key[0] == lora_id})


def _wrap_sync(engine_cls) -> None:
    original, original_remove = engine_cls.add_request, engine_cls.remove_lora

    @functools.wraps(original)
    def add_request(self, request_id, prompt, params, *args, **kwargs):
        lora_request = _lora_request_of(args, kwargs)
        if _needs_loading(self, lora_request):
            _forget(self, lora_request.lora_int_id)
            try:
                self.add_lora(lora_request)
            except Exception as error:  # the utility call's failure, as it returns it
                refusal = _refusal(lora_request, error)
                if refusal is None:
                    raise
                raise refusal from error
            _loaded(self).add(_adapter_key(lora_request))
        return original(self, request_id, prompt, params, *args, **kwargs)

    @functools.wraps(original_remove)
    def remove_lora(self, lora_id, *args, **kwargs):
        _forget(self, lora_id)
        return original_remove(self, lora_id, *args, **kwargs)

    add_request._xla_inference = remove_lora._xla_inference = True
    engine_cls.add_request, engine_cls.remove_lora = add_request, remove_lora


def _wrap_async(engine_cls) -> None:
    original, original_remove = engine_cls.add_request, engine_cls.remove_lora

    @functools.wraps(original)
    async def add_request(self, request_id, prompt, params, *args, **kwargs):
        lora_request = _lora_request_of(args, kwargs)
        if _needs_loading(self, lora_request):
            _forget(self, lora_request.lora_int_id)
            try:
                await self.add_lora(lora_request)
            except Exception as error:
                refusal = _refusal(lora_request, error)
                if refusal is None:
                    raise
                raise refusal from error
            _loaded(self).add(_adapter_key(lora_request))
        return await original(self, request_id, prompt, params, *args, **kwargs)

    @functools.wraps(original_remove)
    async def remove_lora(self, lora_id, *args, **kwargs):
        _forget(self, lora_id)
        return await original_remove(self, lora_id, *args, **kwargs)

    add_request._xla_inference = remove_lora._xla_inference = True
    engine_cls.add_request, engine_cls.remove_lora = add_request, remove_lora


def load_adapters_before_requests() -> None:
    """Wrap the front ends' add_request and remove_lora once (idempotent: the config checks
    run more than once). Both engines are imported here: the server imports AsyncLLM only
    after its config is checked, so waiting for it to appear would leave it unwrapped
    (importing async_llm after llm_engine takes milliseconds)."""
    import vllm.v1.engine.async_llm  # noqa: F401 (the server's)
    import vllm.v1.engine.llm_engine  # noqa: F401 (what vllm.LLM drives)

    for module, name in _ENGINES:
        engine_cls = getattr(sys.modules[module], name)
        if getattr(engine_cls.add_request, "_xla_inference", False):
            continue
        if name == "AsyncLLM":
            _wrap_async(engine_cls)
        else:
            _wrap_sync(engine_cls)
