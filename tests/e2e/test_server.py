"""The README's serve command starts vLLM's OpenAI server on xla-inference; a client chats."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc, url: str, log_path: Path) -> float:
    start = time.monotonic()
    while time.monotonic() - start < STARTUP_TIMEOUT_S:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    # The README's command (./dev serve), with settings that keep warm-up short on CI.
    cmd = [str(ROOT / "dev"), "serve", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16",
           "--max-num-batched-tokens", "256", "--kv-cache-memory-bytes", str(256 << 20)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        ready_s = _wait_healthy(proc, url, log_path)
        print(f"server ready in {ready_s:.0f}s", file=sys.stderr)
        yield url, log_path
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_chat_completion_through_openai_client(server):
    import openai

    url, log_path = server
    assert f"{url}/v1" in log_path.read_text()  # the command says where it listens
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    models = [m.id for m in client.models.list().data]
    assert models == ["SmolLM2-135M-Instruct"]
    reply = client.chat.completions.create(
        model=models[0], messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0.0)
    text = reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0 and text.strip()
    assert "Paris" in text, text
