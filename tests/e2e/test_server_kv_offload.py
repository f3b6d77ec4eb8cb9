"""KV cache offload through the OpenAI server (`--kv-offloading-size`, vLLM's
OffloadingConnector with our worker side, kv_transfer/offload.py): a device cache of 12
pages, too small to keep a long prompt's pages while other prompts run, and a host tier of
24 pages. The long prompt, asked again after the others, is served from the host tier with
transformers' greedy output, and /metrics counts it: vLLM's external prefix-cache hits and
prompt tokens by source, and the offload connector's load bytes."""

import concurrent.futures
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.servers import free_port, stop_server, wait_healthy
from tests.helpers import hf_greedy_ids, save_tiny_llama

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NUM_NEW = 8
PAGE_BYTES = 16 * 2 * 2 * 2 * 16 * 4  # tokens x layers x (K, V) x kv heads x head size x fp32
HOST_PAGES = 24


@contextlib.contextmanager
def _server(model_dir, log_path: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "xla_inference.cli", "serve", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "128", "--max-num-seqs", "2", "--seed", "0",
           "--enable-prompt-tokens-details",
           "--kv-cache-memory-bytes", str(12 * PAGE_BYTES),
           # vLLM's spelling, in GiB: exactly HOST_PAGES pages.
           "--kv-offloading-size", repr(HOST_PAGES * PAGE_BYTES / 2**30)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
    url = f"http://127.0.0.1:{port}"
    try:
        yield proc, url
    finally:
        stop_server(proc)


def _complete(url, model_dir, prompt) -> tuple[list[int], int]:
    """(generated token ids, cached prompt tokens the server reports)."""
    body = dict(model=str(model_dir), prompt=prompt, max_tokens=NUM_NEW, temperature=0.0,
                ignore_eos=True, return_token_ids=True)
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    details = answer["usage"].get("prompt_tokens_details") or {}
    return answer["choices"][0]["token_ids"], details.get("cached_tokens") or 0


def _metrics(url) -> dict[str, float]:
    """Prometheus samples, summed over their labels but `source`: name -> value."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        sample, value = line.rsplit(" ", 1)
        name = sample.split("{", 1)[0]
        if 'source="' in sample:
            name += ":" + sample.split('source="', 1)[1].split('"', 1)[0]
        values[name] = values.get(name, 0.0) + float(value)
    return values


def _run_others(url, model_dir, prompts) -> None:
    """Two at a time (the server runs at most two): their pages push the long prompt's out
    of the device cache."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda p: _complete(url, model_dir, p), prompts))


def test_a_repeated_long_prompt_is_served_from_the_host_tier_and_counted(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "llama")
    rng = np.random.default_rng(3)
    long = rng.integers(3, 128, size=96).tolist()  # 6 full pages, all offloaded
    others = [rng.integers(3, 128, size=90).tolist() for _ in range(3)]  # 5 full pages each
    log_path = tmp_path / "server.log"
    with _server(model_dir, log_path) as (proc, url):
        expected = hf_greedy_ids(model_dir, [long], NUM_NEW)[0]  # while the server starts
        wait_healthy(proc, url, log_path, 600)
        miss = _complete(url, model_dir, long)
        before = _metrics(url)
        _run_others(url, model_dir, others)  # the device cache loses the long prompt
        hit = _complete(url, model_dir, long)  # its pages come back from the host tier
        after = _metrics(url)

    def grew(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert miss == (expected, 0)
    assert hit == (expected, 96)

    # The other prompts hit nothing: every external hit and loaded byte is the long prompt's.
    assert grew("vllm:external_prefix_cache_hits_total") == 96
    assert grew("vllm:prompt_tokens_by_source_total:external_kv_transfer") == 96
    assert grew("vllm:prefix_cache_hits_total") == 0  # the device cache had lost it
    assert grew("vllm:kv_offload_load_bytes_total") == 6 * PAGE_BYTES
    # The others' full pages (5 each) were offloaded too.
    assert grew("vllm:kv_offload_store_bytes_total") == 3 * 5 * PAGE_BYTES
