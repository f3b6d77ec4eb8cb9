"""Offline throughput through vllm.LLM: xla-inference vs vLLM's CPU backend vs HF generate.

N prompts of random token ids (new ones each pass, so no prefix-cache hits), fixed
input/output lengths, greedy, ignore_eos. Each backend runs in its own process (one
engine), one untimed warm-up pass, then `--repeats` timed passes; the median is reported.
xla runs float32 by default (pinned: "auto" resolves to bfloat16 projections on a CPU with
avx512_bf16, float32 on others; xla:auto or xla:bfloat16 runs that); vLLM's CPU backend and
transformers run bfloat16, vLLM's "auto" for this model. Quantized variants, on the same
prompts: xla-int8 (the float32 directory with quantization="int8", weights quantized at
load), xla-gguf (the GGUF file kept quantized, Q4_1: prepare_default_gguf_model's
directory), vllm-cpu-int8 (vLLM's CPU backend on the compressed-tensors W8A8 int8
checkpoint that benchmarks/_server.py writes once; bfloat16 by default, as its int8 kernel
wants), xla-w8a8 (ours on that checkpoint). Each quantized xla run is also compared with
each plain xla run.

    .venv/bin/python benchmarks/offline_throughput.py --backends xla,vllm-cpu,hf
    .venv/bin/python benchmarks/offline_throughput.py \
        --backends xla:bfloat16,xla-int8:bfloat16,xla-gguf:bfloat16 --repeats 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


BACKENDS = ("xla", "xla-int8", "xla-gguf", "xla-w8a8", "xla-stats", "vllm-cpu", "vllm-cpu-int8",
            "hf")


def _prompts(n, length, vocab, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab - 100, size=(n, length)).tolist()


def _model_dir(backend: str) -> str:
    """The directory `backend` runs (see the module docstring)."""
    from xla_inference.loading.default_model import (prepare_default_gguf_model,
                                                     prepare_default_model)

    if backend == "xla-gguf":
        return str(prepare_default_gguf_model())
    if backend in ("vllm-cpu-int8", "xla-w8a8"):
        from _server import prepare_w8a8_model

        return str(prepare_w8a8_model(prepare_default_model()))
    return str(prepare_default_model())


def _run_vllm(args) -> dict:
    from vllm import LLM, SamplingParams

    model = args.model or _model_dir(args.backend)
    quantization = {"quantization": "int8"} if args.backend == "xla-int8" else {}
    t0 = time.perf_counter()
    llm = LLM(model=model, dtype=args.dtype, max_model_len=args.input_len + args.output_len + 16,
              max_num_seqs=args.num_prompts, max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory_bytes=args.kv_cache_gib << 30, seed=0, **quantization,
              **({} if args.async_scheduling is None else
                 dict(async_scheduling=args.async_scheduling == "on")))
    startup = time.perf_counter() - t0
    ours = os.environ.get("VLLM_PLUGINS") != "none"
    compiles_at_ready = llm.collective_rpc("num_compilations")[0] if ours else None
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    times = []
    for i in range(args.repeats + 1):
        # New prompts each pass: repeating them would turn the prefill into prefix-cache hits.
        prompts = [{"prompt_token_ids": p}
                   for p in _prompts(args.num_prompts, args.input_len, 49152, seed=i)]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        if i:  # the first pass warms up
            times.append(time.perf_counter() - t0)
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
        print(f"pass {i}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        if ours and i == 0:
            llm.collective_rpc("step_stats")  # reset: report the timed passes only
    extra = {}
    if ours:
        extra["compilations_after_warmup"] = (llm.collective_rpc("num_compilations")[0]
                                              - compiles_at_ready)
        stats = llm.collective_rpc("step_stats")[0]
        if stats["steps"]:
            extra["step_stats"] = stats
    return dict(startup_s=startup, times_s=times, **extra)


def _run_hf(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from xla_inference.loading.default_model import prepare_default_model

    dtype = torch.float32 if args.dtype in ("float32", "auto") else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(args.model or prepare_default_model(),
                                                 torch_dtype=dtype).eval()
    times = []
    with torch.no_grad():
        for i in range(args.repeats + 1):
            ids = torch.tensor(_prompts(args.num_prompts, args.input_len, 49152, seed=i))
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.output_len,
                                 min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
            if i:
                times.append(time.perf_counter() - t0)
            assert out.shape[1] == args.input_len + args.output_len
    return dict(times_s=times)


def _child(args) -> None:
    result = _run_hf(args) if args.backend == "hf" else _run_vllm(args)
    print("RESULT " + json.dumps(result), flush=True)


def _launch(backend: str, dtype: str, argv: list[str]) -> dict:
    env = dict(os.environ)
    if backend.startswith("vllm-cpu"):
        env["VLLM_PLUGINS"] = "none"
    if backend == "xla-stats":  # a separate run: waiting on every program serialises the step
        backend, env["XLA_INFERENCE_STEP_STATS"] = "xla", "1"
    cmd = [sys.executable, __file__, "--child", backend, "--dtype", dtype, *argv]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{backend} failed (its log is above):\n{proc.stdout[-3000:]}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backends", default="xla,vllm-cpu,hf",
                   help="any of " + ", ".join(BACKENDS) + " (xla-stats: xla again, reporting "
                        "the host overhead: the share of step time outside the compiled "
                        "programs); NAME:DTYPE runs one with that dtype "
                        "(xla:float32,xla:bfloat16)")
    p.add_argument("--dtypes",
                   default="xla=float32,xla-stats=float32,vllm-cpu=bfloat16,hf=bfloat16,"
                           "vllm-cpu-int8=bfloat16",
                   help="dtype per backend")
    p.add_argument("--model", default=None, help="model dir (default: the embedded SmolLM2)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--async-scheduling", choices=("on", "off"), default=None,
                   help="vLLM's async scheduling (default: vLLM's choice per backend)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()
    if args.child:
        args.backend = args.child
        return _child(args)
    dtypes = dict(kv.split("=") for kv in args.dtypes.split(","))
    passthrough = [a for a in sys.argv[1:]]
    labels = args.backends.split(",")
    unknown = [lbl for lbl in labels if lbl.partition(":")[0] not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backends {unknown} (choose from {', '.join(BACKENDS)})")
    results = {}
    for label in labels:
        backend, _, dtype = label.partition(":")
        dtype = dtype or dtypes.get(backend, "auto")
        r = _launch(backend, dtype, passthrough)
        median = statistics.median(r["times_s"])
        r["output_tok_s"] = args.num_prompts * args.output_len / median
        results[label] = r
        print(f"{label:9s} dtype={dtype:9s} median {median:7.2f}s "
              f"-> {r['output_tok_s']:7.1f} output tok/s  {json.dumps(r)}", flush=True)
    _print_ratios(results)


def _print_ratios(results: dict) -> None:
    """Each xla run's throughput over each baseline's (vLLM's CPU backends, transformers),
    and each quantized xla run's over each plain xla run's (xla-stats runs wait on every
    program, so their throughput is not comparable)."""
    name = lambda label: label.partition(":")[0]  # noqa: E731
    ours = [lbl for lbl in results if name(lbl) in ("xla", "xla-int8", "xla-gguf", "xla-w8a8")]
    pairs = [(a, b) for a in ours for b in results
             if name(b) in ("vllm-cpu", "vllm-cpu-int8", "hf")]
    pairs += [(a, b) for a in ours if name(a) != "xla" for b in ours if name(b) == "xla"]
    for label, base in pairs:
        ratio = results[label]["output_tok_s"] / results[base]["output_tok_s"]
        print(f"{label} / {base}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
