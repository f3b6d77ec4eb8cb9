"""Starting, using and stopping vllm.LLM engines in tests."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def start_llm(model_dir, **overrides):
    """A float32 vllm.LLM with small, test-sized limits; `overrides` change any argument."""
    from vllm import LLM

    args = dict(model=str(model_dir), dtype="float32", max_model_len=128, max_num_seqs=8,
                max_num_batched_tokens=64, kv_cache_memory_bytes=4 << 20, seed=0,
                disable_log_stats=False)
    args.update(overrides)
    return LLM(**args)


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def vllm_cpu_reference(module: str, args, out_path: Path):
    """What `python -m module *args out_path` writes to out_path (JSON) when run with vLLM's
    own CPU backend (VLLM_PLUGINS=none; a process of its own, as vLLM picks its platform
    once per process), offline, from the repository root."""
    return _run_module(module, [*args, out_path], out_path, VLLM_PLUGINS="none")


def in_fresh_process(function: str, out_path: Path, **kwargs):
    """`function` ("module:name") called with `kwargs` in a process of its own on this
    platform, vLLM's engine core in that process (tests/e2e/isolated.py); its JSON result."""
    return _run_module("tests.e2e.isolated", [function, json.dumps(kwargs), out_path],
                       out_path)


def _run_module(module: str, args, out_path: Path, **env):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    cmd = [sys.executable, "-m", module, *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode < 0:
        # vLLM's CPU backend (not our code) has aborted in CI with "terminate called without
        # an active exception"; one more try tells a flake from a real failure.
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(Path(out_path).read_text())


def generate_ids(llm, prompts: list[list[int]], **params) -> list[list[int]]:
    """Token ids generated for each prompt with one SamplingParams(**params)."""
    return generate_requests(llm, [{"prompt_token_ids": p} for p in prompts], **params)


def generate_requests(llm, requests: list, **params) -> list[list[int]]:
    """Token ids generated for each request (vLLM's prompt dicts: token ids or text,
    multi_modal_data) with one SamplingParams(**params)."""
    from vllm import SamplingParams

    outs = llm.generate(requests, SamplingParams(**params), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def metric(llm, name: str) -> float:
    """The summed value of one of vLLM's metrics (needs disable_log_stats=False)."""
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == name)


def num_compilations(llm) -> int:
    return llm.collective_rpc("num_compilations")[0]


def greedy_against_transformers(model_dir, num_new: int, kv_cache_memory_bytes: int,
                                inspect=None):
    """Greedy output through vllm.LLM (small steps, so the longest prompt is prefilled in
    chunks) and transformers' greedy output for three prompts: (got, expected, inspected),
    where `inspected` is inspect(llm) while the engine runs (or None)."""
    import numpy as np

    from tests.helpers import hf_greedy_ids

    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 21, 38)]
    expected = hf_greedy_ids(model_dir, prompts, num_new)
    llm = start_llm(model_dir, max_num_seqs=4, max_num_batched_tokens=32,
                    kv_cache_memory_bytes=kv_cache_memory_bytes)
    try:
        inspected = inspect(llm) if inspect else None
        got = generate_ids(llm, prompts, max_tokens=num_new, temperature=0.0, ignore_eos=True)
    finally:
        shutdown(llm)
    return got, expected, inspected
