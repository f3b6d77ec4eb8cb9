"""n-gram speculative decoding through vLLM's OpenAI server on a tiny random Llama: the
acceptance counters (drafts, drafted and accepted tokens, acceptance per draft position)
reach /metrics, agree with each other, and count drafts accepted on a prompt that repeats
itself; greedy text equals transformers' greedy text; logprobs, which speculative steps do
not return yet, are a 400 with the reason, and the server keeps serving."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.servers import free_port, stop_server, wait_healthy
from tests.helpers import hf_greedy_ids, save_tiny_llama

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 600
K = 3
NUM_NEW = 24
NGRAM = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}


@contextlib.contextmanager
def _serve(model_dir: Path, log_path: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "4",
           "--max-num-batched-tokens", "32", "--kv-cache-memory-bytes", str(8 << 20),
           "--speculative-config", json.dumps(NGRAM)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log_path, STARTUP_TIMEOUT_S)
        yield url
    finally:
        stop_server(proc)


def _metrics(url) -> dict[str, float]:
    """vLLM's Prometheus samples: name{labels} -> value (the spec-decode ones)."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:spec_decode"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _total(metrics, name) -> float:
    """A counter's value summed over its labels (Prometheus names its samples NAME_total)."""
    return sum(v for k, v in metrics.items() if k.split("{")[0] == name + "_total")


def test_acceptance_metrics_on_metrics_endpoint_and_logprobs_refused(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "llama")
    prompt = list(range(10, 22)) * 4  # repeats itself: n-gram drafts from the prompt
    expected = hf_greedy_ids(model_dir, [prompt], NUM_NEW)[0]
    with _serve(model_dir, tmp_path / "server.log") as url:
        before = _metrics(url)
        reply = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": prompt, "max_tokens": NUM_NEW, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True})
        assert reply.status_code == 200, reply.text
        got = reply.json()["choices"][0]["token_ids"]
        after = _metrics(url)
        refused = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 4, "logprobs": 2})
        still = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": prompt, "max_tokens": NUM_NEW, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True})
    assert got == expected
    delta = {name: _total(after, name) - _total(before, name) for name in (
        "vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
        "vllm:spec_decode_num_accepted_tokens", "vllm:spec_decode_num_accepted_tokens_per_pos")}
    drafts, drafted, accepted, per_position = delta.values()
    assert 0 < drafts and drafted <= K * drafts
    assert 0 < accepted <= drafted
    assert per_position == accepted  # every accepted draft counted at its position
    positions = {k.split('position="')[1].split('"')[0]
                 for k in after if k.startswith("vllm:spec_decode_num_accepted_tokens_per_pos_total")}
    assert positions == {str(i) for i in range(K)}
    assert refused.status_code == 400
    assert "logprobs with speculative decoding" in refused.json()["error"]["message"]
    assert still.status_code == 200 and still.json()["choices"][0]["token_ids"] == expected
