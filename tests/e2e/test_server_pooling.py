"""The OpenAI server over an embedding model on our platform (vLLM's own server, tiny
random Qwen3 embedder, --runner pooling --convert embed): /v1/embeddings equals
transformers' normalized last-token states, with Matryoshka `dimensions`; /score and
/rerank rank by cosine similarity; `dimensions` past the hidden size is a 400 naming it;
the generation routes are not there (vLLM registers only the pooling model's tasks)."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.servers import free_port, stop_server, wait_healthy
from tests.pooling_models import hf_last_hidden, normalized, save_tiny_qwen3_embedder

pytestmark = pytest.mark.slow

PROMPTS = [[5, 9, 3, 7, 11], list(range(3, 43))]
TOL = 1e-4


@contextlib.contextmanager
def _serve(model_dir: Path, log_path: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
           "--runner", "pooling", "--convert", "embed",
           "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "4",
           "--max-num-batched-tokens", "16", "--kv-cache-memory-bytes", str(4 << 20)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log_path, 900)
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = save_tiny_qwen3_embedder(tmp_path_factory.mktemp("qwen3emb"))
    with _serve(model_dir, tmp_path_factory.mktemp("log") / "server.log") as url:
        yield url, model_dir


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json={"model": "tiny", **body}, timeout=120)


def test_embeddings_endpoint_matches_transformers(served):
    url, model_dir = served
    hidden = hf_last_hidden(model_dir, PROMPTS)
    r = _post(url, "/v1/embeddings", {"input": PROMPTS})
    assert r.status_code == 200, r.text
    for item, h in zip(r.json()["data"], hidden):
        np.testing.assert_allclose(item["embedding"], normalized(h[-1]), atol=TOL, rtol=TOL)
    r = _post(url, "/v1/embeddings", {"input": PROMPTS, "dimensions": 16})
    assert r.status_code == 200, r.text
    for item, h in zip(r.json()["data"], hidden):
        np.testing.assert_allclose(item["embedding"], normalized(h[-1][:16]), atol=TOL, rtol=TOL)


def test_score_and_rerank_rank_the_identical_document_first(served):
    url, _ = served
    docs = ["t8 t9", "t5 t6 t7", "t3 t4 t5 t6 t7"]
    r = _post(url, "/score", {"text_1": "t5 t6 t7", "text_2": docs})
    assert r.status_code == 200, r.text
    scores = [d["score"] for d in r.json()["data"]]
    assert np.argmax(scores) == 1 and scores[1] == pytest.approx(1.0, abs=1e-4)
    r = _post(url, "/rerank", {"query": "t5 t6 t7", "documents": docs})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["index"] == 1


def test_bad_requests_are_refused_with_the_reason(served):
    url, _ = served
    r = _post(url, "/v1/embeddings", {"input": "t5 t6", "dimensions": 65})
    assert r.status_code == 400 and "dimensions" in r.text
    # An embedding model serves no generation: vLLM registers no completion route for it.
    r = _post(url, "/v1/completions", {"prompt": "t5 t6", "max_tokens": 2})
    assert r.status_code in (400, 404), r.text
