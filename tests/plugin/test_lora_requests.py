"""A request's LoRA adapter is loaded (the engine's add_lora) before the request is added
(plugin/lora_requests.py): an adapter the engine refuses fails that request with vLLM's
validation error naming the adapter and the engine's reason, the request never reaches
the engine; a good adapter is loaded once per front end, for the sync (vllm.LLM) and the
async (server) engines. Through vllm.LLM: tests/lora/test_lora_head_spec_llm.py."""

import asyncio

import pytest

from tests.helpers import save_tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # imports vLLM


class _Request:
    def __init__(self, name, lora_id, path):
        self.lora_name, self.lora_int_id, self.lora_path = name, lora_id, path


def _engine_classes():
    """Stand-ins for LLMEngine and AsyncLLM: record what reached the engine; add_lora
    refuses paths containing "bad" with the message a failed utility call carries."""

    def refuse(request):
        if "bad" in request.lora_path:
            raise Exception(f"Call to add_lora method failed: LoRA adapter {request.lora_path}: "
                            "adapter_config.json use_dora: DoRA adapters are not served")

    class Sync:
        def __init__(self):
            self.added, self.loaded = [], []

        def add_lora(self, request):
            self.loaded.append(request.lora_int_id)
            refuse(request)
            return True

        def add_request(self, request_id, prompt, params, arrival_time=None, lora_request=None,
                        **kwargs):
            self.added.append(request_id)
            return request_id

    class Async(Sync):
        async def add_lora(self, request):
            return Sync.add_lora(self, request)

        async def add_request(self, request_id, prompt, params, arrival_time=None,
                              lora_request=None, **kwargs):
            return Sync.add_request(self, request_id, prompt, params)

    return Sync, Async


def test_a_refused_adapter_fails_its_request_before_the_engine(monkeypatch):
    import sys
    import types

    from vllm.exceptions import VLLMValidationError

    from xla_inference.plugin import lora_requests

    Sync, Async = _engine_classes()
    for module, name, cls in (("vllm.v1.engine.llm_engine", "LLMEngine", Sync),
                              ("vllm.v1.engine.async_llm", "AsyncLLM", Async)):
        monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(**{name: cls}))
    lora_requests.load_adapters_before_requests()
    lora_requests.load_adapters_before_requests()  # idempotent: wrapped once
    assert not hasattr(Sync.add_request.__wrapped__, "__wrapped__")
    good, bad = _Request("good", 1, "/a/good"), _Request("dora", 2, "/a/bad")

    engine = Sync()
    with pytest.raises(VLLMValidationError, match="'dora' \\(id 2, /a/bad\\) cannot be served: "
                                                  ".*use_dora") as error:
        engine.add_request("r0", [1], None, lora_request=bad)
    assert error.value.parameter == "lora_request"
    with pytest.raises(VLLMValidationError, match="use_dora"):  # positional, as vLLM may
        engine.add_request("r0", [1], None, None, bad)
    assert engine.added == []  # never reached the engine
    assert engine.add_request("r1", [1], None, lora_request=good) == "r1"
    assert engine.add_request("r2", [1], None, None, good) == "r2"
    assert engine.add_request("r3", [1], None) == "r3"
    assert engine.added == ["r1", "r2", "r3"]
    assert engine.loaded == [2, 2, 1]  # the good adapter loaded once, the bad one each time

    engine = Async()
    with pytest.raises(VLLMValidationError, match="'dora'.*use_dora"):
        asyncio.run(engine.add_request("r0", [1], None, lora_request=bad))
    assert asyncio.run(engine.add_request("r1", [1], None, lora_request=good)) == "r1"
    assert engine.added == ["r1"]


def test_the_check_is_installed_with_lora(tmp_path):
    """check_and_update_config wraps vLLM's LLMEngine when LoRA is enabled."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    model_dir = save_tiny_llama(tmp_path / "llama")
    EngineArgs(model=str(model_dir), max_model_len=128, enable_lora=True).create_engine_config()
    assert getattr(LLMEngine.add_request, "_xla_inference", False)
