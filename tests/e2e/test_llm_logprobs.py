"""Logprobs beyond the top n, through vllm.LLM, against vLLM's own CPU backend on the same
tiny float32 model: logprob_token_ids (the logprobs of chosen ids), logprobs=-1 and
prompt_logprobs=-1 (the whole vocabulary, with max_logprobs=-1).

The reference runs in a subprocess with VLLM_PLUGINS=none (vLLM picks its platform once per
process), in the same environment, greedy, so both engines produce the same tokens."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4  # float32 model on both sides, in log space
WANTED_IDS = [5, 17, 3, 99, 127, 64, 0]

# name -> SamplingParams arguments; every request greedy, so tokens must agree.
CASES = {
    "token_ids": dict(max_tokens=6, logprob_token_ids=WANTED_IDS),
    "token_ids_and_logprobs": dict(max_tokens=3, logprob_token_ids=[9, 8], logprobs=2),
    "whole_vocab": dict(max_tokens=6, logprobs=-1),
    "top_3": dict(max_tokens=4, logprobs=3),
    "prompt_whole_vocab": dict(max_tokens=2, prompt_logprobs=-1),
    "prompt_and_sample_whole_vocab": dict(max_tokens=2, prompt_logprobs=-1, logprobs=-1),
}


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [rng.integers(3, 128, size=n).tolist() for n in (7, 20, 13)]


def _llm_args(model_dir) -> dict:
    return dict(model=str(model_dir), dtype="float32", max_model_len=128, max_num_seqs=8,
                max_num_batched_tokens=64, kv_cache_memory_bytes=8 << 20, seed=0,
                max_logprobs=-1)


def _table(entries) -> list | None:
    """vLLM's per-position {token: Logprob} dicts -> JSON-able [[token, logprob, rank], ...]."""
    if entries is None:
        return None
    return [None if e is None else sorted([t, lp.logprob, lp.rank] for t, lp in e.items())
            for e in entries]


def _run(llm, requests: list[tuple[str, list[int]]]) -> list[dict]:
    """Each (case name, prompt) as one request of a single generate call (one batch)."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.0, ignore_eos=True, **CASES[name])
              for name, _ in requests]
    outs = llm.generate([{"prompt_token_ids": p} for _, p in requests], params, use_tqdm=False)
    return [dict(tokens=list(o.outputs[0].token_ids), logprobs=_table(o.outputs[0].logprobs),
                 prompt_logprobs=_table(o.prompt_logprobs)) for o in outs]


def _reference_main(model_dir: str, out_path: str) -> None:
    """In the VLLM_PLUGINS=none subprocess: vLLM's CPU backend, each case in its own batch
    (vLLM's sampler lets one request's logprob_token_ids replace the others' top n)."""
    from vllm import LLM

    llm = LLM(**_llm_args(model_dir), enforce_eager=True)
    results = {name: _run(llm, [(name, p) for p in _prompts()]) for name in CASES}
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.helpers import save_tiny_family

    # head_dim 32: vLLM's CPU attention needs at least that.
    return save_tiny_family(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3")


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "vllm_cpu.json"
    # The engine core in that process: no second process importing vLLM again.
    env = {**os.environ, "VLLM_PLUGINS": "none", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-m", "tests.e2e.test_llm_logprobs", str(model_dir),
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def ours(model_dir):
    from tests.e2e.engines import num_compilations, shutdown, start_llm

    llm = start_llm(model_dir, **_llm_args(model_dir))
    try:
        compiled = num_compilations(llm)
        alone = {name: _run(llm, [(name, p) for p in _prompts()]) for name in CASES}
        # Every case and prompt in one batch: each request keeps its own kind of logprobs.
        mixed_requests = [(name, p) for name in CASES for p in _prompts()]
        mixed = _run(llm, mixed_requests)
        recompiled = num_compilations(llm) - compiled
    finally:
        shutdown(llm)
    together = {}
    for (name, _), result in zip(mixed_requests, mixed):
        together.setdefault(name, []).append(result)
    return alone, together, recompiled


def _assert_tables_match(got, want, what):
    if want is None:
        assert got is None, what
        return
    assert len(got) == len(want), what
    for pos, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, (what, pos)
            continue
        assert [t for t, _, _ in g] == [t for t, _, _ in w], (what, pos)
        np.testing.assert_allclose([lp for _, lp, _ in g], [lp for _, lp, _ in w], atol=TOL,
                                   err_msg=f"{what} position {pos}")
        assert [r for _, _, r in g] == [r for _, _, r in w], (what, pos)


@pytest.mark.parametrize("name", list(CASES))
def test_logprobs_match_vllms_cpu_backend_alone_and_mixed(reference, ours, name):
    alone, together, _ = ours
    for results, how in ((alone, "alone"), (together, "mixed batch")):
        for i, (got, want) in enumerate(zip(results[name], reference[name])):
            what = f"{name}, prompt {i}, {how}"
            assert got["tokens"] == want["tokens"], what
            _assert_tables_match(got["logprobs"], want["logprobs"], what + ": logprobs")
            _assert_tables_match(got["prompt_logprobs"], want["prompt_logprobs"],
                                 what + ": prompt logprobs")


def test_the_requests_ask_what_they_seem_to(reference):
    # The comparisons above would pass vacuously if the cases returned nothing.
    first = reference["token_ids"][0]["logprobs"][0]
    assert {t for t, _, _ in first} >= set(WANTED_IDS)
    assert len(reference["whole_vocab"][0]["logprobs"][0]) == 128
    prompt = reference["prompt_whole_vocab"][1]["prompt_logprobs"]
    assert prompt[0] is None and all(len(e) == 128 for e in prompt[1:])
    assert len(reference["top_3"][0]["logprobs"][0]) in (3, 4)


def test_no_compilation_after_warm_up(ours):
    assert ours[2] == 0


if __name__ == "__main__":
    _reference_main(*sys.argv[1:3])
