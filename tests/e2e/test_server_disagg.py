"""Prefill/decode disaggregation between two OpenAI servers through XlaNetworkConnector
(kv_transfer/network.py) and the `xla-inference disagg-proxy` command, on this machine: the
prefill server (kv_producer, one device) prefills with max_tokens=1 and keeps the pages; the
decode server (kv_consumer, tensor parallel 2: pages re-sharded) fetches them over TCP and
decodes. Greedy output through the proxy equals transformers' (prefix hits on both sides
included), KV usage returns to 0 on both servers, and the faults: a decode server that never
fetches (the producer frees the pages when the lease ends), a producer that dies (the
consumer fails those requests with a 502 quoting the fetch's error, naming the prefill
server, and keeps serving)."""

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.servers import free_port, stop_server, wait_healthy
from tests.helpers import hf_greedy_ids, save_tiny_llama

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NUM_NEW = 6
LEASE_S = 4
FLAGS = ["--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "8",
         "--max-num-batched-tokens", "32", "--kv-cache-memory-bytes", str(2 << 20),
         "--seed", "0"]


def _start(cmd: list[str], log_path: Path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True, env=env)


@contextlib.contextmanager
def _server(model_dir, role: str, kv_port: int, log_path: Path, *more: str,
            policy: str = "fail"):
    port = free_port()
    transfer = dict(kv_connector="XlaNetworkConnector", kv_role=role, kv_port=kv_port,
                    kv_load_failure_policy=policy,
                    kv_connector_extra_config={"lease_seconds": LEASE_S})
    proc = _start([sys.executable, "-m", "xla_inference.cli", "serve", "--model", str(model_dir),
                   "--host", "127.0.0.1", "--port", str(port), *FLAGS, *more,
                   "--kv-transfer-config", json.dumps(transfer)], log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log_path, 600)
        yield url, proc
    finally:
        if proc.poll() is None:
            stop_server(proc)


@contextlib.contextmanager
def _proxy(prefill: str, decode: str, log_path: Path):
    port = free_port()
    proc = _start([sys.executable, "-m", "xla_inference.cli", "disagg-proxy", "--prefill",
                   prefill, "--decode", decode, "--port", str(port)], log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log_path, 120)
        yield url
    finally:
        stop_server(proc)


def _complete(url, model_dir, prompt, **more) -> dict:
    body = dict(dict(model=str(model_dir), prompt=prompt, max_tokens=NUM_NEW, temperature=0.0,
                     ignore_eos=True, return_token_ids=True), **more)
    return httpx.post(f"{url}/v1/completions", json=body, timeout=300)


def _stream_ids(url, model_dir, prompt) -> list[int]:
    body = dict(model=str(model_dir), prompt=prompt, max_tokens=NUM_NEW, temperature=0.0,
                ignore_eos=True, return_token_ids=True, stream=True)
    ids = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ids += json.loads(line[6:])["choices"][0].get("token_ids") or []
    return ids


def _stream_error(url, model_dir, prompt, **more) -> dict:
    """The error object of a streamed completion that fails."""
    body = dict(model=str(model_dir), prompt=prompt, max_tokens=NUM_NEW, temperature=0.0,
                stream=True, **more)
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return chunk["error"]
    raise AssertionError("the stream ended without an error")


def _metric(url, name, source=None) -> float:
    """A Prometheus metric summed over its labels (or those with this source label)."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if source is None or f'source="{source}"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def _wait_kv_free(url, timeout_s: float) -> float:
    """Seconds until the server's KV cache usage is 0."""
    start = time.monotonic()
    while _metric(url, "vllm:kv_cache_usage_perc") > 0:
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{url} still holds KV pages after {timeout_s}s")
        time.sleep(0.2)
    return time.monotonic() - start


def _wait_port_closed(port: int, timeout_s: float = 20) -> None:
    """Until nothing listens on the port: the API server's exit does not wait for its engine
    core's, and a connection accepted by a dying process is reset, not refused."""
    start = time.monotonic()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return
        except OSError:
            pass
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"port {port} still accepts connections after {timeout_s}s")
        time.sleep(0.1)


def test_proxy_prefill_on_one_server_decode_on_another(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "llama")
    rng = np.random.default_rng(25)
    # Pages of 16 tokens: prompts ending inside a page and on its last token, one prefilled
    # in three chunks (32 tokens a step), two sharing their first pages with earlier ones
    # (prefix-cache hits on both servers: the consumer fetches only what it lacks).
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 16, 33, 90, 21, 47)]
    prompts += [prompts[3][:32] + rng.integers(3, 128, size=9).tolist(),
                prompts[5][:16] + rng.integers(3, 128, size=20).tolist()]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    kv_port = free_port()

    with _server(model_dir, "kv_producer", kv_port, tmp_path / "prefill.log") as (prefill, p_proc), \
            _server(model_dir, "kv_consumer", free_port(), tmp_path / "decode.log",
                    "--tensor-parallel-size", "2") as (decode, _), \
            _proxy(prefill, decode, tmp_path / "proxy.log") as proxy:
        got = []
        for prompt in prompts[:4] + prompts[6:7]:  # one at a time: prefix hits are certain
            reply = _complete(proxy, model_dir, prompt)
            assert reply.status_code == 200, reply.text
            got.append(reply.json()["choices"][0]["token_ids"])
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # batched on both servers
            replies = list(pool.map(lambda p: _complete(proxy, model_dir, p),
                                    [prompts[4], prompts[5], prompts[7]]))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        got += [r.json()["choices"][0]["token_ids"] for r in replies]
        streamed = _stream_ids(proxy, model_dir, prompts[2])
        assert got == [expected[i] for i in (0, 1, 2, 3, 6, 4, 5, 7)]
        assert streamed == expected[2]
        # The decode server computed none of the prompts (the last token of each, which
        # vLLM recomputes to sample from, is not counted): the prefill server's pages, or its
        # own prefix cache (prompts[6], and prompts[2] asked again, at least).
        by_source = {s: _metric(decode, "vllm:prompt_tokens_by_source_total", source=s)
                     for s in ("local_compute", "local_cache_hit", "external_kv_transfer")}
        assert by_source["local_compute"] == 0 and by_source["local_cache_hit"] >= 64
        assert sum(by_source.values()) == sum(len(p) for p in prompts) + len(prompts[2])
        assert _wait_kv_free(prefill, 10) < 10 and _wait_kv_free(decode, 10) < 10

        # A decode server that never fetches: the producer frees the pages after the lease.
        lone = rng.integers(3, 128, size=40).tolist()
        reply = _complete(prefill, model_dir, lone, max_tokens=1,
                          kv_transfer_params={"do_remote_decode": True})
        params = reply.json()["kv_transfer_params"]
        assert params["do_remote_prefill"] and params["remote_num_tokens"] == 40
        assert params["remote_port"] == kv_port
        assert _metric(prefill, "vllm:kv_cache_usage_perc") > 0  # kept for the consumer
        freed_after = _wait_kv_free(prefill, 3 * LEASE_S)
        assert LEASE_S - 2 < freed_after
        # Its pages are gone: a late fetch fails the request with the producer's reason.
        late = _complete(decode, model_dir, lone, kv_transfer_params=params)
        assert late.status_code == 502, late.text
        message = late.json()["error"]["message"]
        assert f"from the prefill server 127.0.0.1:{kv_port} (its request " in message
        assert "its lease of 4s ended unread" in message

        # A producer that dies: the consumer fails those requests and keeps serving.
        reply = _complete(prefill, model_dir, lone, max_tokens=1,
                          kv_transfer_params={"do_remote_decode": True})
        params = reply.json()["kv_transfer_params"]
        os.killpg(p_proc.pid, signal.SIGKILL)
        p_proc.wait()
        _wait_port_closed(kv_port)
        orphan = _complete(decode, model_dir, lone, kv_transfer_params=params)
        assert orphan.status_code == 502, orphan.text
        message = orphan.json()["error"]["message"]
        assert f"from the prefill server 127.0.0.1:{kv_port} (its request " in message
        assert "Connection refused" in message
        # Streamed: the error chunk says the same.
        streamed = _stream_error(decode, model_dir, lone, kv_transfer_params=params)
        assert streamed["code"] == 502 and "Connection refused" in streamed["message"]
        healthy = _complete(decode, model_dir, prompts[1])
        assert healthy.status_code == 200 and healthy.json()["choices"][0]["token_ids"] == \
            expected[1]
        assert _wait_kv_free(decode, 10) < 10
        decode_log = (tmp_path / "decode.log").read_text()
        assert f"from the prefill server 127.0.0.1:{kv_port} (its request " in decode_log
        assert "its lease of 4s ended unread" in decode_log
        assert "Connection refused" in decode_log


def test_with_recompute_a_request_whose_producer_is_gone_is_prefilled_here(tmp_path):
    """kv_load_failure_policy "recompute": the decode server prefills a request whose KV
    fetch failed (nobody listens on its prefill server's KV port) and answers it right."""
    model_dir = save_tiny_llama(tmp_path / "llama")
    prompt = np.random.default_rng(26).integers(3, 128, size=40).tolist()
    dead = free_port()
    params = dict(do_remote_prefill=True, do_remote_decode=False, remote_engine_id="gone",
                  remote_host="127.0.0.1", remote_port=dead, remote_request_id="p-1",
                  remote_block_ids=[0, 1, 2], remote_num_tokens=len(prompt))
    with _server(model_dir, "kv_consumer", free_port(), tmp_path / "decode.log",
                 policy="recompute") as (decode, _):
        expected = hf_greedy_ids(model_dir, [prompt], NUM_NEW)[0]
        reply = _complete(decode, model_dir, prompt, kv_transfer_params=params)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["token_ids"] == expected
        # Every prompt token computed here.
        assert _metric(decode, "vllm:prompt_tokens_by_source_total",
                       source="local_compute") == len(prompt)
        assert _wait_kv_free(decode, 10) < 10
    assert f"from the prefill server 127.0.0.1:{dead} (its request p-1) failed" in \
        (tmp_path / "decode.log").read_text()


def _free_port_pair() -> int:
    """A port p with p + 1 free too (a data parallel 2 producer listens on both)."""
    import socket

    for _ in range(100):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two free ports in a row")


def test_data_parallel_2_on_both_servers(tmp_path):
    """Both servers with --data-parallel-size 2 (kv_transfer/replicas.py): each replica has
    its own connector over its share of the pages; the producer's replica r serves its pages
    on kv_port + r and says so in kv_transfer_params. Requests sent together land on both
    replicas of both servers; greedy output equals transformers', the decode server computes
    no prompt token, and KV usage returns to 0 on both."""
    model_dir = save_tiny_llama(tmp_path / "llama")
    rng = np.random.default_rng(27)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 16, 33, 70, 21, 47)]
    later = [prompts[3][:48] + rng.integers(3, 128, size=7).tolist()]  # a prefix hit on both
    expected = hf_greedy_ids(model_dir, prompts + later, NUM_NEW)
    kv_port = _free_port_pair()

    def disaggregated(prefill, decode, prompt):
        first = _complete(prefill, model_dir, prompt, max_tokens=1,
                          kv_transfer_params={"do_remote_decode": True})
        assert first.status_code == 200, first.text
        params = first.json()["kv_transfer_params"]
        reply = _complete(decode, model_dir, prompt, kv_transfer_params=params)
        assert reply.status_code == 200, reply.text
        return params["remote_port"], reply.json()["choices"][0]["token_ids"]

    dp = ("--data-parallel-size", "2")
    with _server(model_dir, "kv_producer", kv_port, tmp_path / "prefill.log", *dp) as (prefill, _), \
            _server(model_dir, "kv_consumer", free_port(), tmp_path / "decode.log", *dp) as (decode, _):
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda p: disaggregated(prefill, decode, p), prompts))
        results.append(disaggregated(prefill, decode, later[0]))
        by_source = {s: _metric(decode, "vllm:prompt_tokens_by_source_total", source=s)
                     for s in ("local_compute", "local_cache_hit", "external_kv_transfer")}
        assert _wait_kv_free(prefill, 10) < 10 and _wait_kv_free(decode, 10) < 10
    assert [ids for _, ids in results] == expected
    assert {port for port, _ in results} == {kv_port, kv_port + 1}  # both producer replicas
    assert by_source["local_compute"] == 0
    assert sum(by_source.values()) == sum(len(p) for p in prompts + later)


def test_a_decode_server_speculating_with_ngram_on_fetched_pages(tmp_path):
    """The decode side with n-gram speculative decoding: drafts are verified on pages fetched
    from the prefill side. One kv_both server is both sides (it fetches over TCP from its own
    KV port, as from another server); without prefix caching the decode request finds none
    of the prefill request's pages locally and fetches every one. Greedy output equals
    transformers', and drafts were verified."""
    model_dir = save_tiny_llama(tmp_path / "llama")
    rng = np.random.default_rng(28)
    prompts = [list(range(10, 22)) * 4, rng.integers(3, 128, size=37).tolist()]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
             "prompt_lookup_min": 1}
    with _server(model_dir, "kv_both", free_port(), tmp_path / "both.log",
                 "--no-enable-prefix-caching", "--speculative-config",
                 json.dumps(ngram)) as (server, _):
        got = []
        for prompt in prompts:
            first = _complete(server, model_dir, prompt, max_tokens=1,
                              kv_transfer_params={"do_remote_decode": True})
            assert first.status_code == 200, first.text
            params = first.json()["kv_transfer_params"]
            reply = _complete(server, model_dir, prompt, kv_transfer_params=params)
            assert reply.status_code == 200, reply.text
            got.append(reply.json()["choices"][0]["token_ids"])
        computed = _metric(server, "vllm:prompt_tokens_by_source_total",
                           source="local_compute")
        drafted = _metric(server, "vllm:spec_decode_num_draft_tokens_total")
        assert _wait_kv_free(server, 10) < 10
    assert got == expected
    assert computed == sum(len(p) for p in prompts)  # by the prefill requests alone
    assert drafted > 0
