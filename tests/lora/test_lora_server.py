"""vLLM's OpenAI server with --enable-lora on a tiny Llama: an adapter from --lora-modules,
one loaded and unloaded at run time (VLLM_ALLOW_RUNTIME_LORA_UPDATING=1) while other
requests stream, and a DoRA adapter refused with the field's name, the server serving on."""

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.e2e.servers import free_port, stop_server, wait_healthy
from tests.helpers import save_tiny_llama
from tests.lora.lora_helpers import peft_greedy, save_adapters

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPT = [5, 9, 17, 33, 2, 71, 8]
# max-model-len 1536: the streams must outlast the adapter load (480 tokens once did not,
# the tiny model's steps being a few milliseconds)
STREAM_TOKENS = 1500


@contextlib.contextmanager
def _serve(model_dir, adapters, log_path):
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "1536", "--max-num-seqs", "4",
           "--max-num-batched-tokens", "64", "--kv-cache-memory-bytes", str(8 << 20),
           "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16",
           "--lora-modules", f"a4={adapters['a4']}"]
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log_path, 600)
        yield url
    finally:
        stop_server(proc)


def _complete(url, model, max_tokens=8):
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def _stream(url, model, out: list):
    body = {"model": model, "prompt": PROMPT, "max_tokens": STREAM_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append((time.monotonic(), json.loads(line[6:])))


def test_load_and_unload_while_streaming(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "llama", max_positions=2048)
    adapters = save_adapters(model_dir, tmp_path)
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_model.safetensors").write_bytes(
        (adapters["a8"] / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((adapters["a8"] / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with _serve(model_dir, adapters, tmp_path / "server.log") as url:
        models = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert models == {"tiny", "a4"}
        streams = {"tiny": [], "a4": []}
        threads = [threading.Thread(target=_stream, args=(url, m, out)) for m, out in streams.items()]
        for t in threads:
            t.start()
        while not all(streams.values()):  # both stream before the adapter is loaded
            time.sleep(0.01)
        r = httpx.post(f"{url}/v1/load_lora_adapter",
                       json={"lora_name": "a8", "lora_path": str(adapters["a8"])}, timeout=120)
        assert r.status_code == 200, r.text
        loaded_at = time.monotonic()
        a8 = _complete(url, "a8")
        assert a8.status_code == 200, a8.text
        r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a8"}, timeout=120)
        assert r.status_code == 200, r.text
        gone = _complete(url, "a8")
        bad = httpx.post(f"{url}/v1/load_lora_adapter",
                         json={"lora_name": "dora", "lora_path": str(dora)}, timeout=120)
        for t in threads:
            t.join()
        after = _complete(url, "a4")
    assert a8.json()["choices"][0]["token_ids"] == peft_greedy(model_dir, adapters["a8"], PROMPT, 8)
    assert gone.status_code == 404, gone.text
    assert bad.status_code >= 400 and "use_dora" in bad.text, bad.text
    assert after.json()["choices"][0]["token_ids"] == peft_greedy(model_dir, adapters["a4"], PROMPT, 8)
    for model, chunks in streams.items():  # both still streamed after the load, to the end
        assert chunks[-1][0] > loaded_at, model
        assert chunks[-1][1]["usage"]["completion_tokens"] == STREAM_TOKENS, (model, chunks[-1])
