"""Embeddings, classification and scores through vllm.LLM on our platform: a tiny random
Qwen3 embedder (--convert embed, LAST pooling, normalized) and a tiny Llama with a
one-label classification head, prompts of mixed lengths with one longer than a step
(chunked prefill; prefix caching on, vLLM's default), against transformers (1e-4) and
against vLLM's own CPU backend on the same checkpoints (VLLM_PLUGINS=none, a subprocess:
vLLM picks its platform once per process). Requests a pooling model cannot serve
(generation; dimensions past the hidden size) are refused with the reason."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.pooling_models import (hf_classify_logits, hf_last_hidden, normalized,
                                  save_tiny_llama_classifier, save_tiny_qwen3_embedder)

pytestmark = pytest.mark.slow

PROMPTS = [[5, 9, 3, 7, 11], list(range(3, 43)), [40, 41, 42, 8, 9, 10, 99, 1, 4]]
QUERY, DOCS = "t5 t6 t7", ["t8 t9", "t3 t4 t5 t6 t7", "t5 t6 t7"]
TOL = 1e-4


def _llm_args(model_dir, **extra) -> dict:
    # 16 tokens a step: the 40-token prompt runs over three steps.
    return dict(model=str(model_dir), dtype="float32", max_model_len=128, max_num_seqs=4,
                max_num_batched_tokens=16, kv_cache_memory_bytes=4 << 20, seed=0,
                runner="pooling", **extra)


def _run_embed(llm) -> dict:
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    return dict(
        embed=[o.outputs.embedding for o in llm.embed(prompts, use_tqdm=False)],
        embed16=[o.outputs.embedding for o in llm.embed(
            prompts, pooling_params=_pooling(dimensions=16), use_tqdm=False)],
        embed_score=[o.outputs.score for o in llm.score(QUERY, DOCS, use_tqdm=False)])


def _run_classify(llm) -> dict:
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    return dict(
        classify=[o.outputs.probs for o in llm.classify(prompts, use_tqdm=False)],
        classify_score=[o.outputs.score for o in llm.score(QUERY, DOCS, use_tqdm=False)])


def _pooling(**kw):
    from vllm import PoolingParams

    return PoolingParams(**kw)


def _reference_main(embed_dir: str, classify_dir: str, out_path: str) -> None:
    """One vLLM CPU engine at a time, each shut down before the next starts: two CPU
    engines alive in one process crashed vLLM's CPU backend in CI ("terminate called
    without an active exception", both bind their OpenMP threads to the same cores)."""
    from tests.e2e.engines import shutdown
    from vllm import LLM

    out = {}
    for run, args in ((_run_embed, _llm_args(embed_dir, convert="embed")),
                      (_run_classify, _llm_args(classify_dir))):
        llm = LLM(**args, enforce_eager=True)
        out.update(run(llm))
        shutdown(llm)
    Path(out_path).write_text(json.dumps(out))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return (save_tiny_qwen3_embedder(tmp_path_factory.mktemp("qwen3emb")),
            save_tiny_llama_classifier(tmp_path_factory.mktemp("llamacls"), num_labels=1))


@pytest.fixture(scope="module")
def reference(model_dirs, tmp_path_factory):
    from tests.e2e.engines import vllm_cpu_reference

    out = tmp_path_factory.mktemp("reference") / "vllm_cpu.json"
    return vllm_cpu_reference("tests.e2e.test_llm_pooling", model_dirs, out)


@pytest.fixture(scope="module")
def ours(model_dirs):
    from tests.e2e.engines import num_compilations, shutdown
    from vllm import LLM

    embed = LLM(**_llm_args(model_dirs[0], convert="embed"))
    classify = LLM(**_llm_args(model_dirs[1]))
    try:
        compiled = num_compilations(embed)
        out = {**_run_embed(embed), **_run_classify(classify)}
        out["recompiled"] = num_compilations(embed) - compiled
        out["refusals"] = _refusals(embed)
    finally:
        shutdown(embed)
        shutdown(classify)
    return out


def _refusals(llm) -> dict:
    """The message of each request an embedding model refuses."""
    from vllm import SamplingParams

    said = {}
    for name, call in [
            ("generate", lambda: llm.generate([{"prompt_token_ids": [5, 6]}],
                                              SamplingParams(max_tokens=2), use_tqdm=False)),
            ("dimensions", lambda: llm.embed([{"prompt_token_ids": [5, 6]}],
                                             pooling_params=_pooling(dimensions=65),
                                             use_tqdm=False))]:
        try:
            call()
            said[name] = None
        except Exception as e:  # noqa: BLE001 (the message is what is checked)
            said[name] = str(e)
    return said


def _cos(a, b) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_embeddings_match_transformers_and_vllm_cpu(model_dirs, ours, reference):
    hidden = hf_last_hidden(model_dirs[0], PROMPTS)
    for i, h in enumerate(hidden):
        np.testing.assert_allclose(ours["embed"][i], normalized(h[-1]), atol=TOL, rtol=TOL)
        np.testing.assert_allclose(ours["embed16"][i], normalized(h[-1][:16]), atol=TOL, rtol=TOL)
    for key in ("embed", "embed16", "embed_score"):
        np.testing.assert_allclose(ours[key], reference[key], atol=TOL, rtol=TOL)
    assert ours["recompiled"] == 0


def test_classify_and_score_match_transformers_and_vllm_cpu(model_dirs, ours, reference):
    logits = hf_classify_logits(model_dirs[1], PROMPTS)
    for i, z in enumerate(logits):
        np.testing.assert_allclose(ours["classify"][i], 1 / (1 + np.exp(-z)), atol=TOL, rtol=TOL)
    for key in ("classify", "classify_score"):
        np.testing.assert_allclose(ours[key], reference[key], atol=TOL, rtol=TOL)
    # The identical document scores highest, through both kinds of model.
    assert np.argmax(ours["embed_score"]) == 2


def test_requests_an_embedding_model_cannot_serve_are_refused(ours):
    assert "generate" in ours["refusals"]["generate"].lower() or \
        "not supported" in ours["refusals"]["generate"].lower()
    assert "dimensions" in ours["refusals"]["dimensions"]


if __name__ == "__main__":
    _reference_main(*sys.argv[1:4])
    sys.stdout.flush()
    os._exit(0)  # the answer is written; skip interpreter-exit teardown of vLLM's threads
