"""The README's serve command starts vLLM's OpenAI server on xla-inference; clients use it,
misuse it and walk away mid-stream, and it keeps serving everyone else."""

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

from tests.e2e.servers import free_port, stop_server, wait_healthy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 900
MODEL = "SmolLM2-135M-Instruct"


@contextlib.contextmanager
def dev_serve(args: list[str], log_path: Path):
    """`./dev serve --host 127.0.0.1 --port P *args` until /health answers; yields (url,
    seconds to ready); stops the server and its engine processes afterwards."""
    port = free_port()
    cmd = [str(ROOT / "dev"), "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, wait_healthy(proc, url, log_path, STARTUP_TIMEOUT_S)
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    # The README's command (./dev serve), with settings that keep warm-up short on CI.
    args = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "32",
            "--max-num-batched-tokens", "256", "--kv-cache-memory-bytes", str(256 << 20)]
    with dev_serve(args, log_path) as (url, ready_s):
        print(f"server ready in {ready_s:.0f}s", file=sys.stderr)
        yield url, log_path

def _client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _metrics(url) -> dict[str, float]:
    """vLLM's Prometheus metrics, summed over labels: name -> value."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:"):
            name, value = line.rsplit(" ", 1)
            name = name.split("{")[0]
            values[name] = values.get(name, 0.0) + float(value)
    return values


def _wait_idle(url, timeout_s=60.0) -> dict[str, float]:
    """Metrics once no request runs or waits (aborted ones included)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = _metrics(url)
        if m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"requests still running after {timeout_s}s: {m}")
        time.sleep(0.5)


def _complete(url, prompt, **params) -> str:
    reply = _client(url).completions.create(model=MODEL, prompt=prompt, **params)
    return reply.choices[0].text


def test_endpoints_health_models_completions_streaming_and_metrics(server):
    url, _ = server
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    client = _client(url)
    text = _complete(url, "The capital of France is", max_tokens=12, temperature=0.0)
    assert "Paris" in text, text
    chunks = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=20, temperature=0.0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=20, temperature=0.0).choices[0].message.content
    assert streamed == whole and whole.strip()
    m = _wait_idle(url)
    assert m["vllm:generation_tokens_total"] >= 32 and m["vllm:prompt_tokens_total"] > 10
    assert m["vllm:request_success_total"] >= 3


def test_logprobs_n_and_seed_through_the_api(server):
    url, _ = server
    client = _client(url)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6,
        temperature=0.0, logprobs=True, top_logprobs=3)
    for item in reply.choices[0].logprobs.content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0.0
        # greedy: the chosen token is the most likely one
        assert abs(item.logprob - item.top_logprobs[0].logprob) < 1e-5
    many = client.completions.create(model=MODEL, prompt="My favourite fruit is", n=3,
                                     max_tokens=12, temperature=1.0, seed=7)
    again = client.completions.create(model=MODEL, prompt="My favourite fruit is", n=3,
                                      max_tokens=12, temperature=1.0, seed=7)
    assert len(many.choices) == 3
    assert [c.text for c in many.choices] == [c.text for c in again.choices]


def test_json_schema_response_format(server):
    url, _ = server
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    reply = _client(url).chat.completions.create(
        model=MODEL, max_tokens=80, temperature=0.0,
        messages=[{"role": "user", "content": "Give the largest city of Japan and its population."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


BAD_REQUESTS = [
    ("prompt longer than max_model_len", {"prompt": "hello " * 2000, "max_tokens": 4}, 400),
    ("max_tokens beyond max_model_len", {"prompt": "hi", "max_tokens": 100000}, 400),
    ("negative temperature", {"prompt": "hi", "max_tokens": 4, "temperature": -1.0}, 400),
    ("top_p above one", {"prompt": "hi", "max_tokens": 4, "top_p": 2.0}, 400),
    ("logprobs beyond the maximum", {"prompt": "hi", "max_tokens": 4, "logprobs": 1000}, 400),
    ("n of zero", {"prompt": "hi", "max_tokens": 4, "n": 0}, 400),
    ("kv_transfer_params without a KV connector",
     {"prompt": "hi", "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}, 400),
    ("unknown model", {"prompt": "hi", "max_tokens": 4, "model": "no-such-model"}, 404),
]


@pytest.mark.parametrize("what,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server, what, body, status):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == status, (what, r.status_code, r.text)
    assert r.json()["error"]["message"]
    assert _complete(url, "The capital of France is", max_tokens=4, temperature=0.0).strip()


def test_malformed_json_gets_a_4xx(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "x", "messages": [',
                   headers={"content-type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    assert _complete(url, "Water boils at", max_tokens=4, temperature=0.0).strip()


def test_client_disconnecting_mid_stream_frees_its_request(server):
    url, _ = server
    before = _wait_idle(url)
    body = {"model": MODEL, "prompt": "Write a very long story about a dragon.",
            "max_tokens": 400, "temperature": 0.0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break  # leaving the block closes the connection
    after = _wait_idle(url, timeout_s=30)
    # The aborted request generated far fewer than its 400 tokens, and its pages are free.
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 300
    assert after.get("vllm:kv_cache_usage_perc", 0.0) == 0.0


CROWD_PROMPTS = [
    "The capital of France is", "Water boils at", "List three primary colors:",
    "Q: What is 12 times 12?\nA:", "Once upon a time", "The best way to learn Python is",
    "Translate to French: 'Good morning'", "def add(a, b):",
]


def _crowd_params(i: int) -> dict:
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.8, top_p=0.9, seed=1000 + i),
        dict(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3),
        dict(temperature=1.0, seed=2000 + i, extra_body=dict(top_k=20, min_p=0.05)),
    ]
    return dict(max_tokens=16, **kinds[i % len(kinds)])


async def _crowd_request(client, i: int):
    prompt = CROWD_PROMPTS[i % len(CROWD_PROMPTS)]
    if i % 5 == 4:  # walks away after a few streamed tokens
        stream = await client.completions.create(model=MODEL, prompt=prompt, stream=True,
                                                 max_tokens=200, temperature=0.0,
                                                 extra_body=dict(ignore_eos=True))
        async for n, _ in _aenumerate(stream):
            if n >= 2:
                break
        await stream.close()
        return None
    reply = await client.completions.create(model=MODEL, prompt=prompt, **_crowd_params(i))
    return reply.choices[0].text, reply.choices[0].finish_reason


async def _aenumerate(stream):
    n = 0
    async for item in stream:
        yield n, item
        n += 1


def test_64_concurrent_clients_with_mixed_parameters_and_walkaways(server):
    import openai

    url, _ = server
    alone = {i: _complete(url, CROWD_PROMPTS[i % len(CROWD_PROMPTS)], **_crowd_params(i))
             for i in range(64) if i % 5 != 4 and i < 16}

    async def crowd():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        try:
            return await asyncio.gather(*(_crowd_request(client, i) for i in range(64)))
        finally:
            await client.close()

    results = asyncio.run(crowd())
    for i, result in enumerate(results):
        if i % 5 == 4:
            continue
        text, finish = result
        assert finish in ("length", "stop") and text
        if i in alone:  # greedy and seeded requests give what they give alone
            assert text == alone[i], (i, _crowd_params(i))
    idle = _wait_idle(url, timeout_s=60)
    assert idle.get("vllm:kv_cache_usage_perc", 0.0) == 0.0
