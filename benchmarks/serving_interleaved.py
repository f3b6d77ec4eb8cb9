"""Batch-1 latency of several servers, their requests interleaved: every backend's server runs
at once, and each round sends one request to each in turn, so slow spells of a shared machine
fall on all of them alike.

`serving.py` measures one backend's server after another, each with `vllm bench serve`. On the
project's noisy 2-vCPU machines one backend's TPOT moves 20-50% within the hour, so a ratio
of two such runs says as much about when each ran as about the backends (RESULTS.md,
2026-12-04: 0.40-0.61 for the same pair). Here the servers are up together (an idle server
takes no CPU: its engine core blocks on its input queue), one request at a time goes out,
backend after backend, the order rotated each round, and each round gives its own ratios.

Each request: --input-len random token ids (a new prompt each round, the same for every
backend), --output-len tokens out with ignore_eos, greedy, streamed. TTFT: until the first
streamed token; TPOT: (end - first token) / (tokens - 1), as `vllm bench serve` counts it.
One request per backend first warms each up (not counted); --pause seconds pass before each
request (vLLM's CPU backend leaves a core busy after its request: our 512-token prefill right
after one took 790-840 ms against 402-417 ms with the pause). Prints each round, then per
backend the median TTFT and TPOT and the median (and range) of its per-round ratios to
--baseline. Backends and flags as in serving.py (its BACKENDS; extra server flags after `--`):

    .venv/bin/python benchmarks/serving_interleaved.py --backends xla,xla-gguf --rounds 16

A backend may name environment variables for its server after "+": two servers of one
backend, a setting's A/B (e.g. plugin/allocator.py's malloc):

    .venv/bin/python benchmarks/serving_interleaved.py \
        --backends xla-gguf,xla-gguf+XLA_INFERENCE_MIMALLOC=0 --rounds 16
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request

import numpy as np
from _server import free_port, server
from serving import _model_dir, _server_cmd

from xla_inference.loading.default_model import DEFAULT_MODEL_NAME, prepare_default_model


def _parse_args():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="xla,xla-gguf", help="comma-separated (serving.py's)")
    p.add_argument("--baseline", default=None, help="ratios against it (default: the first)")
    p.add_argument("--dtypes", default="xla=bfloat16,xla-gguf=bfloat16,xla-int8=bfloat16,"
                                        "xla-w8a8=bfloat16,xla-awq=bfloat16,vllm-cpu=bfloat16,"
                                        "vllm-cpu-int8=bfloat16",
                   help="backend=dtype, comma-separated (others: auto)")
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    p.add_argument("--pause", type=float, default=1.0,
                   help="seconds between requests: vLLM's CPU backend keeps a core busy a "
                        "while after its request (our prefill right after it took 1.9x)")
    p.add_argument("--ready-timeout", type=float, default=1800.0)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json", default=None, help="write every request's figures here")
    return p.parse_args(argv), extra


def timed_request(port: int, prompt: list[int], output_len: int) -> dict:
    """One streamed greedy completion of `prompt` (token ids): ttft_ms, tpot_ms, tokens."""
    body = json.dumps({"model": DEFAULT_MODEL_NAME, "prompt": prompt, "max_tokens": output_len,
                       "ignore_eos": True, "temperature": 0.0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = tokens = None
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data: "):])
            if first is None and chunk.get("choices"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    if first is None or tokens != output_len:
        raise RuntimeError(f"port {port}: {tokens} tokens streamed, {output_len} asked")
    return dict(ttft_ms=(first - t0) * 1e3, tpot_ms=(end - first) * 1e3 / (tokens - 1),
                tokens=tokens)


def _with_env(backend: str) -> tuple[str, dict]:
    """"xla-gguf+NAME=VALUE+...": serving.py's backend, and what its server's environment
    sets beyond this process's."""
    name, *settings = backend.split("+")
    return name, dict(setting.split("=", 1) for setting in settings)


def _start_all(stack: contextlib.ExitStack, args, backends, dtypes, extra, log_dir) -> dict:
    """Each backend's server, started one after another (each waits until ready): ports."""
    ports = {}
    for backend in backends:
        port = free_port()
        name, settings = _with_env(backend)
        cmd, env = _server_cmd(name, args, dtypes.get(name, "auto"), port, _model_dir(name),
                               extra)
        env.update(settings)
        name = backend.replace("+", "_").replace("/", "_")  # (a value may be a path)
        log = os.path.join(log_dir, f"{name}.server.log")
        print(f"{backend}: starting {' '.join(cmd)}", flush=True)
        ready_s = stack.enter_context(server(cmd, port, log, env, args.ready_timeout))
        print(f"{backend}: ready in {ready_s:.1f}s (log {log})", flush=True)
        ports[backend] = port
    return ports


def _summary(results: dict, backends: list[str], baseline: str) -> dict:
    """Per backend: median TTFT and TPOT, and its per-round ratios to the baseline's."""
    out = {}
    for backend in backends:
        rows = results[backend]
        ratios = [r["tpot_ms"] / b["tpot_ms"] for r, b in zip(rows, results[baseline])]
        ttft_ratios = [r["ttft_ms"] / b["ttft_ms"] for r, b in zip(rows, results[baseline])]
        out[backend] = dict(
            ttft_ms=statistics.median(r["ttft_ms"] for r in rows),
            tpot_ms=statistics.median(r["tpot_ms"] for r in rows),
            tpot_ratio=statistics.median(ratios), tpot_ratio_range=(min(ratios), max(ratios)),
            ttft_ratio=statistics.median(ttft_ratios))
    return out


def main():
    args, extra = _parse_args()
    backends = args.backends.split(",")
    baseline = args.baseline or backends[0]
    if baseline not in backends:
        raise SystemExit(f"--baseline {baseline} is not among --backends")
    dtypes = dict(kv.split("=") for kv in args.dtypes.split(",") if kv)
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="serving-interleaved-")
    with open(os.path.join(prepare_default_model(), "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    rng = np.random.default_rng(args.seed)
    results = {b: [] for b in backends}
    with contextlib.ExitStack() as stack:
        ports = _start_all(stack, args, backends, dtypes, extra, log_dir)
        warm = rng.integers(0, vocab, args.input_len).tolist()
        for backend in backends:
            timed_request(ports[backend], warm, args.output_len)
        print(f"\n{args.rounds} rounds, one request each: {args.input_len} tokens in, "
              f"{args.output_len} out (ignore_eos, greedy); ms")
        for r in range(args.rounds):
            prompt = rng.integers(0, vocab, args.input_len).tolist()
            order = backends[r % len(backends):] + backends[:r % len(backends)]
            for backend in order:
                time.sleep(args.pause)
                results[backend].append(timed_request(ports[backend], prompt, args.output_len))
            print(f"round {r:2d}: " + "  ".join(
                f"{b} TTFT {results[b][-1]['ttft_ms']:6.0f} TPOT {results[b][-1]['tpot_ms']:5.2f}"
                for b in backends), flush=True)
    summary = _summary(results, backends, baseline)
    print(f"\nmedians over {args.rounds} rounds; ratios: each round's against {baseline}'s, "
          f"their median (and range)")
    for backend, s in summary.items():
        lo, hi = s["tpot_ratio_range"]
        print(f"{backend:10s} TTFT {s['ttft_ms']:7.0f} ms ({s['ttft_ratio']:.2f}x)   TPOT "
              f"{s['tpot_ms']:6.2f} ms ({s['tpot_ratio']:.2f}x, rounds {lo:.2f}-{hi:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), extra=extra, requests=results, summary=summary), f,
                      indent=1)


if __name__ == "__main__":
    main()
