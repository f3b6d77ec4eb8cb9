"""The decode server's answer to a request whose KV pages could not be fetched from its
prefill server (kv_load_failure_policy "fail", vLLM's default).

vLLM finishes such a request with finish reason "error", and its OpenAI server answers that
with a bare 500 "Internal server error" (a final error chunk when streaming): the reason
stays in the engine's log. The server's front-end (plugin/server.py) wraps the engine
client's generate: when a request that carried a remote prefill's kv_transfer_params ends
in error, it asks the worker whether its fetch failed (the worker RPC kv_load_failure, keyed
by the prefill server's request id). Only when the worker names a load failure does the
request fail with a 502 that quotes it (the reason names the prefill server); an error the
worker has no load failure for (or that it cannot be asked about) is not the prefill
server's: vLLM's own error output passes through. Other requests are untouched.

Front-end only: imports vLLM's front-end, never JAX."""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus

from vllm.exceptions import GenerationError

logger = logging.getLogger(f"vllm.{__name__}")

# The worker answers between two engine steps; past this, vLLM's own error answer goes out.
_ASK_TIMEOUT_S = 10.0


class KvLoadError(GenerationError):
    """A request's KV could not be loaded from its prefill server: a 502 (the decode server
    is a gateway to the prefill server's pages) with the reason."""

    def __init__(self, message: str):
        super().__init__(message)
        self.status_code = HTTPStatus.BAD_GATEWAY


def remote_prefill(sampling_params) -> dict | None:
    """The kv_transfer_params of a request whose prompt's KV comes from a prefill server."""
    params = (getattr(sampling_params, "extra_args", None) or {}).get("kv_transfer_params")
    if not isinstance(params, dict) or not params.get("do_remote_prefill"):
        return None
    if not all(k in params for k in ("remote_host", "remote_port", "remote_request_id")):
        return None
    return params


async def load_failure(engine_client, params: dict) -> str | None:
    """The worker's reason why a remote prefill's KV failed to load, None when it names no
    load failure (or cannot be asked)."""
    try:
        reasons = await asyncio.wait_for(
            engine_client.collective_rpc("kv_load_failure",
                                         args=(str(params["remote_request_id"]),)),
            _ASK_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - vLLM's own answer must still go out
        logger.warning("xla-inference: asking the worker whether a KV load failed: %r", error)
        return None
    return next((r for r in reasons or () if r), None)


def report_kv_load_errors(engine_client) -> None:
    """Wrap engine_client.generate (the OpenAI server's handlers call it): a remote-prefill
    request that ends in error because its KV failed to load raises KvLoadError instead of
    yielding its error output."""
    vllm_generate = engine_client.generate

    async def generate(prompt, sampling_params, request_id, *args, **kwargs):
        params = remote_prefill(sampling_params)
        failed = None
        async for output in vllm_generate(prompt, sampling_params, request_id, *args, **kwargs):
            if (params is not None and output.finished
                    and any(c.finish_reason == "error" for c in output.outputs)):
                failed = output  # the last output: the engine's generate ends after it
                continue
            yield output
        if failed is None:
            return
        reason = await load_failure(engine_client, params)
        if reason is None:  # not a load failure: vLLM's own error answer
            yield failed
            return
        message = (f"{reason}; kv_load_failure_policy is 'fail' (with 'recompute' in "
                   f"--kv-transfer-config this server prefills such requests itself)")
        logger.error("xla-inference: request %s: %s", request_id, message)
        raise KvLoadError(message)

    engine_client.generate = generate
