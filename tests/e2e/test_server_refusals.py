"""What the platform refuses reaches an OpenAI client as a 400 with the message (not an
empty 500), streamed or not; what it used to refuse (logprobs=-1, top_logprobs=-1,
prompt_logprobs=-1, logprob_token_ids) is served, through chat and completions alike.

vLLM's own OpenAI server on a tiny random model, on 127.0.0.1, with --max-logprobs -1 and
--enable-prompt-embeds (prompt embeddings are what xla-inference still refuses per request).
A quantization xla-inference does not serve stops the server at start-up, with the message
in its log."""

import base64
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.servers import free_port, stop_server, wait_healthy

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 60
VOCAB = 128
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


@contextlib.contextmanager
def _serve(model_dir: Path, log_path: Path):
    port = free_port()
    template = model_dir / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "4",
           "--max-num-batched-tokens", "64", "--kv-cache-memory-bytes", str(8 << 20),
           "--max-logprobs", "-1", "--enable-prompt-embeds", "--chat-template", str(template)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log_path, STARTUP_TIMEOUT_S)
        yield url + "/v1"
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.helpers import save_tiny_family

    model_dir = save_tiny_family(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3")
    with _serve(model_dir, tmp_path_factory.mktemp("log") / "server.log") as url:
        yield url


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json={"model": "tiny", **body}, timeout=REQUEST_TIMEOUT_S)


def _stream_events(url: str, path: str, body: dict) -> tuple[int, list[dict]]:
    """(HTTP status, the JSON of each server-sent event before [DONE])."""
    events = []
    with httpx.stream("POST", url + path, json={"model": "tiny", **body, "stream": True},
                      timeout=REQUEST_TIMEOUT_S) as r:
        if r.status_code != 200:
            return r.status_code, [json.loads(r.read())]
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    return r.status_code, events


def _embeddings() -> str:
    import torch

    buf = io.BytesIO()
    torch.save(torch.randn(5, 64), buf)  # 5 positions of the tiny model's hidden size
    return base64.b64encode(buf.getvalue()).decode()


def _assert_still_serving(url):
    r = _post(url, "/completions", {"prompt": "t5 t9", "max_tokens": 2, "temperature": 0.0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].strip()


def test_refusal_is_a_400_with_the_message(server):
    r = _post(server, "/completions", {"prompt_embeds": _embeddings(), "max_tokens": 3})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "does not take prompt embeddings" in error["message"]
    assert error["code"] == 400 and error["param"] == "prompt_embeds"
    _assert_still_serving(server)


def test_streamed_refusal_carries_the_400_and_the_message(server):
    # The refusal comes once the stream has started: vLLM sends it as the stream's one event.
    status, events = _stream_events(server, "/completions",
                                    {"prompt_embeds": _embeddings(), "max_tokens": 3})
    errors = [e["error"] for e in events if "error" in e]
    assert errors and len(errors) == len(events), (status, events)
    assert errors[0]["code"] == 400 and "does not take prompt embeddings" in errors[0]["message"]
    _assert_still_serving(server)


def _top(entries) -> set[str]:
    return {e["token"] for e in entries}


def test_whole_vocabulary_logprobs_are_served_in_chat_and_completions(server):
    r = _post(server, "/completions", {"prompt": "t5 t9 t17", "max_tokens": 3, "logprobs": -1,
                                        "temperature": 0.0, "prompt_logprobs": -1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert [len(top) for top in choice["logprobs"]["top_logprobs"]] == [VOCAB] * 3
    prompt = choice["prompt_logprobs"]
    assert prompt[0] is None and len(prompt) >= 3
    assert all(len(p) == VOCAB for p in prompt[1:])
    chat = {"messages": [{"role": "user", "content": "t5 t9"}], "max_tokens": 3,
            "temperature": 0.0, "logprobs": True, "top_logprobs": -1}
    r = _post(server, "/chat/completions", chat)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [len(_top(c["top_logprobs"])) for c in content] == [VOCAB] * 3
    status, events = _stream_events(server, "/chat/completions", chat)
    streamed = [c for e in events for ch in e["choices"] if ch.get("logprobs")
                for c in ch["logprobs"]["content"]]
    assert status == 200 and [c["token"] for c in streamed] == [c["token"] for c in content]
    assert all(len(_top(c["top_logprobs"])) == VOCAB for c in streamed)


def test_logprob_token_ids_are_served_in_chat_and_completions(server):
    wanted = {"t3", "t40", "t99"}
    ids = [int(t[1:]) for t in sorted(wanted)]
    r = _post(server, "/completions", {"prompt": "t5 t9 t17", "max_tokens": 3, "logprobs": 3,
                                        "logprob_token_ids": ids, "temperature": 0.0})
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]
    for sampled, top in zip(logprobs["tokens"], logprobs["top_logprobs"]):
        assert set(top) == wanted | {sampled}
    chat = {"messages": [{"role": "user", "content": "t5 t9"}], "max_tokens": 3,
            "temperature": 0.0, "logprobs": True, "logprob_token_ids": ids}
    r = _post(server, "/chat/completions", chat)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(_top(c["top_logprobs"]) >= wanted for c in content)
    status, events = _stream_events(server, "/chat/completions", chat)
    streamed = [c for e in events for ch in e["choices"] if ch.get("logprobs")
                for c in ch["logprobs"]["content"]]
    assert status == 200
    assert [(c["token"], c["logprob"]) for c in streamed] == [(c["token"], c["logprob"])
                                                              for c in content]
    assert all(_top(c["top_logprobs"]) >= wanted for c in streamed)


NVFP4 = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
         "config_groups": {"group_0": {
             "targets": ["Linear"], "format": "nvfp4-pack-quantized",
             "weights": {"num_bits": 4, "type": "float", "symmetric": True,
                         "strategy": "tensor_group", "group_size": 16, "dynamic": False},
             "input_activations": {"num_bits": 4, "type": "float", "symmetric": True,
                                   "strategy": "tensor_group", "group_size": 16,
                                   "dynamic": "local"}}}}


@pytest.mark.parametrize("quantization_config, flags, message", [
    (NVFP4, [], "(NVFP4)"),
    (None, ["--quantization", "bitsandbytes"], "does not support quantization 'bitsandbytes'"),
], ids=["compressed-tensors-nvfp4", "flag-bitsandbytes"])
def test_an_unserved_quantization_stops_the_server_at_start_up(tmp_path, quantization_config,
                                                                flags, message):
    from tests.helpers import save_tiny_family

    model_dir = save_tiny_family(tmp_path / "qwen3", "qwen3")
    if quantization_config is not None:
        config = json.loads((model_dir / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (model_dir / "config.json").write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(free_port()), "--max-model-len", "128", *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S,
                          env={**os.environ})
    log = done.stdout + done.stderr
    assert done.returncode != 0, log[-4000:]
    assert message in log and "supported" in log, log[-4000:]
