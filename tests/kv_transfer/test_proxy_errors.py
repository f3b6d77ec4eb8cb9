"""The disaggregation proxy (kv_transfer/proxy.py) when the decode server fails a request
(vLLM answers a failed KV fetch with a bare "Internal server error"): the client gets a 502
naming the decode server, the prefill server that held the KV, and whether that one still
answers. Fake servers through httpx's mock transport."""

import httpx
from fastapi.testclient import TestClient

from xla_inference.kv_transfer.proxy import build_app

PREFILL, DECODE = "http://prefill:8100", "http://decode:8200"
PARAMS = {"remote_host": "10.0.0.1", "remote_port": 14579, "remote_request_id": "p-1"}


def _proxy(decode_status: int) -> TestClient:
    """A proxy before a live prefill server and a decode server answering decode_status."""
    def handle(request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if url.startswith(PREFILL):
            if url.endswith("/health"):
                return httpx.Response(200)
            return httpx.Response(200, json={"choices": [{"text": "a"}],
                                             "kv_transfer_params": PARAMS})
        if decode_status != 200:
            return httpx.Response(decode_status, json={"error": {
                "message": "Internal server error", "type": "InternalServerError"}})
        return httpx.Response(200, json={"choices": [{"text": "a b c"}]})

    return TestClient(build_app([PREFILL], [DECODE], transport=httpx.MockTransport(handle)))


def _post(client, **body):
    return client.post("/v1/completions", json=dict(model="m", prompt="x", max_tokens=3, **body))


def test_a_decode_failure_names_both_servers_and_a_live_prefill_server():
    answer = _post(_proxy(decode_status=500))
    assert answer.status_code == 502
    message = answer.json()["error"]["message"]
    assert f"decode server {DECODE} failed the request (HTTP 500: Internal server error)" in message
    assert f"prefill server {PREFILL} is up (HTTP 200)" in message


def test_decode_failure_after_the_prefill_server_died():
    calls = {"prefill": 0}

    def handle(request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if url.startswith(PREFILL):
            calls["prefill"] += 1
            if calls["prefill"] > 1:  # dead after answering the prefill
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(200, json={"choices": [{"text": "a"}],
                                             "kv_transfer_params": PARAMS})
        return httpx.Response(500, json={"error": {"message": "Internal server error"}})

    client = TestClient(build_app([PREFILL], [DECODE], transport=httpx.MockTransport(handle)))
    for body in ({}, {"stream": True}):
        calls["prefill"] = 0
        answer = _post(client, **body)
        assert answer.status_code == 502
        message = answer.json()["error"]["message"]
        assert f"the prefill server {PREFILL} that holds its KV does not answer" in message
        assert "ConnectError: connection refused" in message
        assert f"decode server {DECODE}" in message


def test_decode_answers_pass_through():
    ok = _proxy(decode_status=200)
    answer = _post(ok)
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == "a b c"
    bad_request = _proxy(decode_status=400)
    assert _post(bad_request).status_code == 400  # a client error is the client's, as is
