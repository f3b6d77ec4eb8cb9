"""A request's LoRA adapter is loaded (the engine's add_lora) before the request is added
(plugin/lora_requests.py): an adapter the engine refuses fails that request with vLLM's
validation error naming the adapter and the engine's reason, the request never reaches
the engine; a good adapter is loaded once per front end, for the sync (vllm.LLM) and the
async (server) engines. Only the worker's refusal (marked ADAPTER_REFUSED) becomes the
validation error; any other failure propagates as it came. remove_lora and load_inplace
make the front end load the adapter again. Through vllm.LLM:
tests/lora/test_lora_head_spec_llm.py."""

import asyncio

import pytest

from tests.helpers import save_tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # imports vLLM


class _Request:
    def __init__(self, name, lora_id, path, load_inplace=False):
        self.lora_name, self.lora_int_id, self.lora_path = name, lora_id, path
        self.load_inplace = load_inplace


def _engine_classes():
    """Stand-ins for LLMEngine and AsyncLLM: record what reached the engine; add_lora
    refuses paths containing "bad" with the message a failed utility call carries (the
    worker's refusal, marked); a path containing "dead" or "transport" fails otherwise."""
    from vllm.v1.engine.exceptions import EngineDeadError

    from xla_inference.plugin.lora_requests import ADAPTER_REFUSED

    def refuse(request):
        if "bad" in request.lora_path:
            raise Exception(f"Call to add_lora method failed: {ADAPTER_REFUSED}LoRA adapter "
                            f"{request.lora_path}: adapter_config.json use_dora: DoRA adapters "
                            "are not served")
        if "dead" in request.lora_path:
            raise EngineDeadError()
        if "transport" in request.lora_path:
            raise ConnectionResetError("socket closed")

    class Sync:
        def __init__(self):
            self.added, self.loaded, self.removed = [], [], []

        def add_lora(self, request):
            self.loaded.append(request.lora_int_id)
            refuse(request)
            return True

        def add_request(self, request_id, prompt, params, arrival_time=None, lora_request=None,
                        **kwargs):
            self.added.append(request_id)
            return request_id

        def remove_lora(self, lora_id):
            self.removed.append(lora_id)
            return True

    class Async(Sync):
        async def add_lora(self, request):
            return Sync.add_lora(self, request)

        async def remove_lora(self, lora_id):
            return Sync.remove_lora(self, lora_id)

        async def add_request(self, request_id, prompt, params, arrival_time=None,
                              lora_request=None, **kwargs):
            return Sync.add_request(self, request_id, prompt, params)

    return Sync, Async


def _wrapped_stand_ins(monkeypatch):
    import sys
    import types

    from xla_inference.plugin import lora_requests

    Sync, Async = _engine_classes()
    for module, name, cls in (("vllm.v1.engine.llm_engine", "LLMEngine", Sync),
                              ("vllm.v1.engine.async_llm", "AsyncLLM", Async)):
        monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(**{name: cls}))
    lora_requests.load_adapters_before_requests()
    return Sync, Async


def test_a_refused_adapter_fails_its_request_before_the_engine(monkeypatch):
    from vllm.exceptions import VLLMValidationError

    from xla_inference.plugin import lora_requests

    Sync, Async = _wrapped_stand_ins(monkeypatch)
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


def test_only_the_adapters_refusal_becomes_a_validation_error(monkeypatch):
    """The engine core dead or the transport failing is no fault of the adapter: those
    propagate unchanged, the request not added."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    Sync, Async = _wrapped_stand_ins(monkeypatch)
    for path, kind in (("/a/dead", EngineDeadError), ("/a/transport", ConnectionResetError)):
        request = _Request("x", 3, path)
        engine = Sync()
        with pytest.raises(kind) as error:
            engine.add_request("r0", [1], None, lora_request=request)
        assert not isinstance(error.value, VLLMValidationError)
        engine = Async()
        with pytest.raises(kind) as error:
            asyncio.run(engine.add_request("r0", [1], None, lora_request=request))
        assert not isinstance(error.value, VLLMValidationError)
        assert engine.added == []


def test_remove_lora_and_load_inplace_load_the_adapter_again(monkeypatch):
    Sync, Async = _wrapped_stand_ins(monkeypatch)
    good = _Request("good", 1, "/a/good")
    engine = Sync()
    engine.add_request("r0", [1], None, lora_request=good)
    engine.add_request("r1", [1], None, lora_request=good)
    assert engine.loaded == [1]
    assert engine.remove_lora(1) and engine.removed == [1]
    engine.add_request("r2", [1], None, lora_request=good)  # removed: loaded again
    assert engine.loaded == [1, 1]
    inplace = _Request("good", 1, "/a/good", load_inplace=True)
    engine.add_request("r3", [1], None, lora_request=inplace)
    engine.add_request("r4", [1], None, lora_request=inplace)  # each time: the files may change
    assert engine.loaded == [1, 1, 1, 1]
    assert engine.added == ["r0", "r1", "r2", "r3", "r4"]

    engine = Async()
    asyncio.run(engine.add_request("r0", [1], None, lora_request=good))
    assert asyncio.run(engine.remove_lora(1)) and engine.removed == [1]
    asyncio.run(engine.add_request("r1", [1], None, lora_request=good))
    asyncio.run(engine.add_request("r2", [1], None, lora_request=inplace))
    assert engine.loaded == [1, 1, 1]


def test_the_worker_marks_a_refusal_and_nothing_else():
    from xla_inference.lora.peft import LoraError
    from xla_inference.plugin.lora_requests import ADAPTER_REFUSED
    from xla_inference.plugin.worker import XlaWorker

    class Runner:
        def __init__(self, error):
            self.error = error

        def add_lora(self, request):
            raise self.error

    worker = object.__new__(XlaWorker)
    worker.model_runner = Runner(LoraError("LoRA adapter /a: use_dora"))
    with pytest.raises(LoraError, match=f"^{ADAPTER_REFUSED}LoRA adapter /a: use_dora$"):
        worker.add_lora(_Request("x", 1, "/a"))
    worker.model_runner = Runner(RuntimeError("device lost"))
    with pytest.raises(RuntimeError, match="^device lost$"):
        worker.add_lora(_Request("x", 1, "/a"))


def test_a_malformed_adapter_is_refused_as_the_others(tmp_path):
    """A broken adapter_config.json or safetensors file is the adapter's fault: LoraError."""
    from xla_inference.lora.peft import LoraError, load_adapter

    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoraError, match="not JSON"):
        load_adapter(tmp_path, {}, 8)
    (tmp_path / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 8, '
                                                  '"target_modules": ["q_proj"]}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x05garbage")
    with pytest.raises(LoraError, match="adapter_model.safetensors"):
        load_adapter(tmp_path, {}, 8)


def test_the_check_is_installed_with_lora(tmp_path):
    """check_and_update_config wraps vLLM's LLMEngine, and the server's AsyncLLM, which the
    server imports only after the config is checked, when LoRA is enabled."""
    import subprocess
    import sys

    model_dir = save_tiny_llama(tmp_path / "llama")
    # A fresh process: AsyncLLM not imported before the config is created, as in the server.
    script = f"""
import sys
from vllm.engine.arg_utils import AsyncEngineArgs
assert "vllm.v1.engine.async_llm" not in sys.modules
AsyncEngineArgs(model={str(model_dir)!r}, max_model_len=128,
                enable_lora=True).create_engine_config()
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.llm_engine import LLMEngine
for cls in (AsyncLLM, LLMEngine):
    for method in (cls.add_request, cls.remove_lora):
        assert getattr(method, "_xla_inference", False), (cls, method)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
