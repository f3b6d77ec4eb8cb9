"""Batch-1 latency of llama.cpp on the embedded SmolLM2 GGUF (Q4_1), in-process.

The same file xla-inference serves kept quantized (`xla-inference serve` with no model;
benchmarks/serving.py's `xla-gguf` backend), run by llama.cpp through its Python binding,
which builds llama.cpp from source (not a project dependency; install it by hand):

    .venv/bin/python -m pip install llama-cpp-python
    .venv/bin/python benchmarks/llama_cpp.py --input-len 512 --output-len 64 --threads 2

For each of --num-prompts prompts of random token ids (as vLLM's random dataset draws them:
new ids per prompt, so nothing is reused from a cache) it times, after one untimed warm-up
prompt, greedily (top-1, EOS ignored):
- TTFT: from handing the prompt to llama.cpp until the first generated token is out (the
  prefill plus one sampling);
- TPOT: the mean time per token of the remaining --output-len - 1 tokens (as vllm bench
  serve defines it).
It prints the medians (and each prompt's figures) against the batch-1 memory floor: the
GGUF's bytes / --bandwidth-gbs per token, and writes them with --json. By default llama.cpp
runs without its repacked-weight buffers (--extra-buffers turns them on): on a CPU with
AMX its AMX product crashed in the sandboxed VM these figures come from.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from xla_inference.loading.default_model import default_gguf_path

# Run as a script, this file's folder comes first on sys.path, where this file itself would
# shadow the binding's package of the same name.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def _without_extra_buffers(llama_module) -> None:
    """Make the binding load models with use_extra_bufts off: no weights repacked for
    llama.cpp's AMX or CPU_REPACK kernels. On a Xeon with AMX, ggml repacks the Q4_1 and
    Q8_0 tensors for AMX, whose product dies (SIGSEGV in ggml_backend_amx_mul_mat) in the
    sandboxed VM this was measured in. The binding exposes no such argument, so its
    default-parameters function is wrapped."""
    default = llama_module.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params


def _load(path: str, args):
    try:
        from llama_cpp import Llama
        from llama_cpp import llama as llama_module
    except ImportError as e:
        raise SystemExit("llama_cpp is not installed: .venv/bin/python -m pip install "
                         "llama-cpp-python") from e
    if not args.extra_buffers:
        _without_extra_buffers(llama_module)
    n_ctx = args.input_len + args.output_len + 16
    # The whole prompt in one batch (a batch larger than the context crashes llama.cpp).
    return Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                 flash_attn=args.flash_attn, n_threads=args.threads, n_threads_batch=args.threads, seed=0,
                 verbose=False)


def _time_one(llm, prompt: list[int], output_len: int) -> tuple[float, float]:
    """(TTFT, TPOT) in seconds of one greedy generation of `output_len` tokens."""
    llm.reset()  # nothing of the previous prompt is reused
    stamps = []
    t0 = time.perf_counter()
    for _ in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                          reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == output_len:
            break
    ttft = stamps[0] - t0
    tpot = (stamps[-1] - stamps[0]) / (output_len - 1) if output_len > 1 else float("nan")
    return ttft, tpot


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=None, help="GGUF file (default: the embedded SmolLM2)")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flash-attn", action="store_true",
                   help="llama.cpp's flash attention (the binding's default: off)")
    p.add_argument("--extra-buffers", action="store_true",
                   help="let llama.cpp repack weights for its AMX / CPU_REPACK kernels "
                        "(off by default: AMX crashed here)")
    p.add_argument("--bandwidth-gbs", type=float, default=45.0,
                   help="memory bandwidth (GB/s) for the batch-1 TPOT floor")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    path = str(args.gguf or default_gguf_path())
    llm = _load(path, args)
    vocab = llm.n_vocab()
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(100, vocab - 100, size=(args.num_prompts + 1, args.input_len))
    _time_one(llm, prompts[0].tolist(), args.output_len)  # warm-up
    runs = [_time_one(llm, p.tolist(), args.output_len) for p in prompts[1:]]
    ttft = statistics.median(r[0] for r in runs) * 1e3
    tpot = statistics.median(r[1] for r in runs) * 1e3
    weight_bytes = os.path.getsize(path)
    floor_ms = weight_bytes / (args.bandwidth_gbs * 1e9) * 1e3

    print(f"llama.cpp on {os.path.basename(path)}: {args.num_prompts} prompts x "
          f"{args.input_len} tokens in, {args.output_len} out (greedy), "
          f"{args.threads} threads")
    print("per prompt TTFT ms: " + " ".join(f"{r[0] * 1e3:.0f}" for r in runs))
    print("per prompt TPOT ms: " + " ".join(f"{r[1] * 1e3:.2f}" for r in runs))
    print(f"{'TTFT med ms':>12}{'TPOT med ms':>12}{'weight MB':>10}{'floor ms':>10}"
          f"{'floor/TPOT':>11}")
    print(f"{ttft:>12.0f}{tpot:>12.2f}{weight_bytes / 1e6:>10.1f}{floor_ms:>10.2f}"
          f"{floor_ms / tpot:>11.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=vars(args), gguf=path, median_ttft_ms=ttft,
                           median_tpot_ms=tpot, weight_bytes=weight_bytes,
                           floor_ms=floor_ms, runs_s=runs), f, indent=1)


if __name__ == "__main__":
    main()
