"""Batch-1 decode on the embedded SmolLM2 GGUF (Q4_1) kept quantized, in one process, the
variants' steps taking turns (ABAB...), medians and fastest: our engine's step with a
layer's products that share their input as one native kernel call each ("fused": q/k/v,
gate/up; quantization/product.quantized_project_many) against one call per product
("separate", the path before), and llama.cpp (llama-cpp-python, the same file, 2 threads)
decoding one token at a time ("llama.cpp", optional). A benchmark, not a test.

Our step decodes a ~300-token context (benchmarks/_engine_steps.py); llama.cpp first takes
a 300-token prompt, then one token a round (its context grows by --repeats tokens). Both
compute the logits of the step; neither samples. Each number is only valid against the
others of the same run (the machine is shared): the load average is printed with them.

    PYTHONPATH=. .venv/bin/python benchmarks/quantized_decode_step.py --repeats 60
    PYTHONPATH=. .venv/bin/python benchmarks/quantized_decode_step.py --repeats 60 --llama-cpp

Two builds of the kernel (say, another kMultiBytesPerThread: its -D define) are compared in
separate processes taken in turns (a tree per build, --variants fused), not in one process:
with a second build of the library loaded, both engines' steps took 0.4 s of CPU time (not
understood).
"""

import argparse
import contextlib
import os
import statistics
import sys
import time
from unittest import mock

import jax
import numpy as np
from _engine_steps import BLOCK, CONTEXT, decode_requests, load_variant

from xla_inference.loading.default_model import default_gguf_path
from xla_inference.quantization import product
from xla_inference.runner.build import build_engine
from xla_inference.runner.engine import EngineConfig


def _engine(variant: str, ecfg, reqs):
    """The GGUF engine, its step traced with the multi-weight call off ("separate") or on
    ("fused")."""
    engine = build_engine(load_variant("gguf"), ecfg)
    patch = (mock.patch.object(product, "uses_multi_kernel", lambda ws, rows: False)
             if variant == "separate" else contextlib.nullcontext())
    with patch:
        jax.block_until_ready(engine.forward(reqs).logits)
    return lambda: jax.block_until_ready(engine.forward(reqs).logits)


def _llama_cpp(repeats: int, threads: int):
    """A step of llama.cpp: one more token decoded after a CONTEXT-token prompt."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    from llama_cpp import Llama
    from llama_cpp import llama as llama_module

    default = llama_module.llama_cpp.llama_model_default_params

    def params():  # as benchmarks/llama_cpp.py: no repacked AMX buffers (crashed here)
        p = default()
        p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    n_ctx = CONTEXT + repeats + 32
    llm = Llama(model_path=str(default_gguf_path()), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    rng = np.random.default_rng(0)
    llm.eval(rng.integers(100, llm.n_vocab() - 100, CONTEXT).tolist())
    tokens = iter(rng.integers(100, llm.n_vocab() - 100, repeats + 8).tolist())
    llm.eval([next(tokens)])  # warm-up
    return lambda: llm.eval([next(tokens)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--variants", nargs="*", default=["separate", "fused"],
                        help="separate, fused (none: llama.cpp alone, with --llama-cpp)")
    parser.add_argument("--llama-cpp", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's threads")
    args = parser.parse_args()
    ecfg = EngineConfig(num_blocks=64, block_size=BLOCK, max_num_tokens=512, max_num_seqs=8,
                        max_model_len=1024)
    reqs = decode_requests(1, np.random.default_rng(0), 1)
    steps = {name: _engine(name, ecfg, reqs) for name in args.variants}
    if args.llama_cpp:
        steps["llama.cpp"] = _llama_cpp(args.repeats, args.threads)
    times = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, step in steps.items():
            c0, t0 = time.process_time(), time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    loads.append(os.getloadavg()[0])
    print(f"load average {loads[0]:.1f} -> {loads[1]:.1f}; batch-1 decode step, median and "
          f"fastest of {args.repeats}, variants alternated (ratio: first variant's time / this)")
    first = next(iter(times))
    for name, t in times.items():
        m = statistics.median(t)
        print(f"{name:10s} median {m * 1e3:8.2f} ms ({statistics.median(times[first]) / m:.2f}x)"
              f"   fastest {min(t) * 1e3:8.2f} ms ({min(times[first]) / min(t):.2f}x)   CPU median "
              f"{statistics.median(cpu[name]) * 1e3:8.2f} ms", flush=True)


if __name__ == "__main__":
    main()
