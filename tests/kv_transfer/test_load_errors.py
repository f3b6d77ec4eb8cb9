"""The decode server's front-end (kv_transfer/load_errors.py) when a remote prefill's KV
failed to load: the request fails with a 502 quoting the worker's reason; a remote-prefill
request that failed for another reason (the worker names no load failure, or cannot be
asked) and other requests, failed ones included, pass through as vLLM yields them. A fake
engine client in place of vLLM's AsyncLLM."""

import asyncio
import types

import pytest

from xla_inference.kv_transfer.load_errors import KvLoadError, report_kv_load_errors

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # imports vLLM's exceptions

PARAMS = {"do_remote_prefill": True, "remote_host": "10.0.0.1", "remote_port": 14579,
          "remote_request_id": "p-1", "remote_num_tokens": 40}
REASON = ("KV fetch of request d-1 from the prefill server 10.0.0.1:14579 (its request p-1) "
          "failed: [Errno 111] Connection refused")


def _output(finish_reason=None):
    return types.SimpleNamespace(finished=finish_reason is not None, outputs=[
        types.SimpleNamespace(finish_reason=finish_reason)])


class FakeEngine:
    def __init__(self, finish_reason: str, reasons):
        self.finish_reason, self.reasons, self.asked = finish_reason, reasons, []

    async def generate(self, prompt, sampling_params, request_id, **kwargs):
        yield _output()
        yield _output(self.finish_reason)

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.asked.append((method, args))
        if isinstance(self.reasons, Exception):
            raise self.reasons
        return self.reasons


def _run(engine, kv_transfer_params):
    report_kv_load_errors(engine)
    params = types.SimpleNamespace(extra_args={"kv_transfer_params": kv_transfer_params})

    async def collect():
        return [o async for o in engine.generate("prompt", params, "d-1")]

    return asyncio.run(collect())


def test_a_failed_fetch_answers_502_with_the_workers_reason():
    engine = FakeEngine("error", [REASON])
    with pytest.raises(KvLoadError) as failed:
        _run(engine, dict(PARAMS))
    assert failed.value.status_code == 502
    assert str(failed.value).startswith(REASON)
    assert "kv_load_failure_policy is 'fail'" in str(failed.value)
    assert engine.asked == [("kv_load_failure", ("p-1",))]


@pytest.mark.parametrize("reasons", [[None], [None, None], [], RuntimeError("engine busy")])
def test_an_error_the_worker_names_no_load_failure_for_is_vllms_own(reasons):
    """An error after the KV arrived (or one the worker cannot be asked about) is not the
    prefill server's: vLLM's error output, not a 502 blaming it."""
    engine = FakeEngine("error", reasons)
    outputs = _run(engine, dict(PARAMS))
    assert [o.outputs[0].finish_reason for o in outputs] == [None, "error"]
    assert engine.asked == [("kv_load_failure", ("p-1",))]


def test_any_workers_reason_makes_the_502():
    """With several workers (tensor parallel ranks) the one that names a failure counts."""
    with pytest.raises(KvLoadError) as failed:
        _run(FakeEngine("error", [None, REASON]), dict(PARAMS))
    assert str(failed.value).startswith(REASON)


@pytest.mark.parametrize("finish_reason, params", [
    ("length", PARAMS),  # served: the fetch worked
    ("error", None),  # not a remote prefill: vLLM's own answer
    ("error", dict(PARAMS, do_remote_prefill=False)),
])
def test_other_requests_pass_through(finish_reason, params):
    engine = FakeEngine(finish_reason, [REASON])
    outputs = _run(engine, params)
    assert [o.outputs[0].finish_reason for o in outputs] == [None, finish_reason]
    assert engine.asked == []
