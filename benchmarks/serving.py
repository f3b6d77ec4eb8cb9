"""Online serving: xla-inference's server vs vLLM's CPU backend, measured by `vllm bench serve`.

For each backend: start its OpenAI server on the embedded SmolLM2-135M, record the seconds
from launch until /health answers, then run vLLM's own serving benchmark (random prompts of
--input-len tokens, --output-len tokens out with ignore_eos, greedy) once per request rate,
each rate with its own prompts so prefix caching does not carry over between rates; then
stop the server and its engine process. Every backend gets the same prompts (same seeds,
same tokenizer). Backends (--backends, comma-separated):

- `xla`: `xla-inference serve` on the float32 directory (prepare_default_model), --dtype
  from --dtypes (bfloat16: bfloat16 projections);
- `xla-gguf`: `xla-inference serve` on the GGUF file kept quantized (Q4_1; the directory of
  prepare_default_gguf_model, what a bare `xla-inference serve` runs);
- `xla-int8`: the float32 directory with `--quantization int8` (weights quantized at load);
- `xla-w8a8`: `xla-inference serve` on vllm-cpu-int8's W8A8 checkpoint (below);
- `xla-awq`: an AWQ 4-bit checkpoint of SmolLM2 (gemm packing, group size 64, zero points;
  round-to-nearest, uncalibrated), written once under the cache
  (models/SmolLM2-135M-Instruct-awq, _server.prepare_awq_model);
- `vllm-cpu`: vLLM's own CPU backend (its api_server, VLLM_PLUGINS=none) on the float32
  directory;
- `vllm-cpu-int8`: vLLM's CPU backend on a compressed-tensors W8A8 int8 checkpoint of
  SmolLM2 (per-channel int8 weights, dynamic per-token int8 activations), written once by
  compressed_tensors under the cache (models/SmolLM2-135M-Instruct-w8a8); its int8 kernel
  wants --dtype bfloat16.

    .venv/bin/python benchmarks/serving.py --backends xla,vllm-cpu --request-rates 1,4,inf

Batch-1 latency (TTFT of a 512-token prompt, TPOT alone on the server):

    .venv/bin/python benchmarks/serving.py --request-rates inf --max-concurrency 1 \
        --num-prompts 8 --input-len 512 --output-len 64 --max-model-len 1024

For the xla backends it also counts the XLA programs the engine built after warm-up (each
one is a warning line in the server log; runner/compile_counter.py): serving should build
none. It prints one row per backend and rate (ready seconds; request/s and output tok/s;
TTFT, TPOT and ITL median and p99 in ms), then each backend's ratios to the --baseline
backend per rate (above 1: faster for the throughputs, slower for the latencies), then each
backend's median TPOT against the batch-1 memory floor: the weight bytes a decode step reads
/ --bandwidth-gbs (xla: the weight bytes its worker logs, less the float32 embedding table
kept for the row gather beside the LM head; vLLM: the checkpoint's tensors at the served
dtype, int8 tensors at one byte). `--json PATH` writes every figure `vllm bench
serve` returned. Server and client logs stay in --log-dir (a new temp dir by default).
Extra server flags for every backend follow `--`.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile

from _server import (checkpoint_weight_bytes, free_port, log_tail, prepare_awq_model,
                     prepare_w8a8_model, server, vllm_serve_cmd, xla_serve_cmd)

from xla_inference.loading.default_model import (DEFAULT_MODEL_NAME, prepare_default_gguf_model,
                                                 prepare_default_model)
from xla_inference.runner.compile_counter import AFTER_WARM_UP

# `vllm bench serve` without the `vllm` script (broken in vllm-cpu 0.32): its own argparse
# setup and entry point, run in a client process of its own.
_BENCH = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
          "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
          "p = P(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")

COLUMNS = [  # (header, key in vllm bench serve's result, format)
    ("req/s", "request_throughput", "{:7.2f}"),
    ("out tok/s", "output_throughput", "{:9.1f}"),
    ("TTFT med", "median_ttft_ms", "{:8.0f}"),
    ("TTFT p99", "p99_ttft_ms", "{:8.0f}"),
    ("TPOT med", "median_tpot_ms", "{:8.1f}"),
    ("TPOT p99", "p99_tpot_ms", "{:8.1f}"),
    ("ITL med", "median_itl_ms", "{:8.1f}"),
    ("ITL p99", "p99_itl_ms", "{:8.1f}"),
]


def _bench(args, port: int, rate: str, seed: int, tokenizer_dir: str, log_dir: str,
           tag: str) -> dict:
    name = f"{tag}-rate{rate}"
    cmd = [sys.executable, "-c", _BENCH, "--host", "127.0.0.1", "--port", str(port),
           "--model", DEFAULT_MODEL_NAME, "--tokenizer", tokenizer_dir,
           "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
           "--ignore-eos", "--temperature", "0", "--request-rate", rate, "--seed", str(seed),
           "--num-warmups", str(args.num_warmups), "--disable-tqdm",
           *(["--max-concurrency", str(args.max_concurrency)] if args.max_concurrency else []),
           "--save-result", "--result-dir", log_dir, "--result-filename", f"{name}.json"]
    log = os.path.join(log_dir, f"{name}.client.log")
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=dict(os.environ, VLLM_PLUGINS="none"), stdout=f,
                            stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"vllm bench serve failed ({rc}); log {log}:\n{log_tail(log)}")
    with open(os.path.join(log_dir, f"{name}.json")) as f:
        return json.load(f)


BACKENDS = ("xla", "xla-gguf", "xla-int8", "xla-w8a8", "xla-awq", "vllm-cpu", "vllm-cpu-int8")


def _model_dir(backend: str) -> str:
    """The directory `backend` serves (see the module docstring)."""
    if backend == "xla-gguf":
        return str(prepare_default_gguf_model())
    if backend in ("vllm-cpu-int8", "xla-w8a8"):
        return str(prepare_w8a8_model(prepare_default_model()))
    if backend == "xla-awq":
        return str(prepare_awq_model(prepare_default_model()))
    return str(prepare_default_model())


def _server_cmd(backend: str, args, dtype: str, port: int, model_dir: str,
                extra: list[str]) -> tuple[list[str], dict]:
    if backend not in BACKENDS:
        raise SystemExit(f"unknown backend {backend!r} ({', '.join(BACKENDS)})")
    flags = ["--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
             "--max-model-len", str(args.max_model_len),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens),
             "--max-num-seqs", str(args.max_num_seqs),
             "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes), *extra]
    env = dict(os.environ)
    if backend.startswith("xla"):
        env.pop("VLLM_PLUGINS", None)
        # The model named explicitly: a bare `xla-inference serve` serves the GGUF.
        quantization = ["--quantization", "int8"] if backend == "xla-int8" else []
        return xla_serve_cmd("--model", model_dir, "--served-model-name", DEFAULT_MODEL_NAME,
                             *quantization, *flags), env
    env["VLLM_PLUGINS"] = "none"  # no platform plugin: vLLM picks its CPU backend
    return vllm_serve_cmd(model_dir, *flags), env


def _weight_bytes(backend: str, dtype: str, model_dir: str, log: str) -> int | None:
    """Bytes of weights a batch-1 decode step reads. xla: the worker's own count (its load
    line in the server log) less the float32 embedding table it keeps for the row gather
    beside the LM head's copy (a step reads one row of it); vLLM: the checkpoint's tensors
    at the served dtype (SmolLM2's embedding is its LM head)."""
    if not backend.startswith("xla"):
        return checkpoint_weight_bytes(model_dir, dtype)
    with open(log, errors="replace") as f:
        found = re.findall(r"([\d.]+) MiB of weights", f.read())
    if not found:
        return None
    with open(os.path.join(_model_dir("xla"), "config.json")) as f:
        config = json.load(f)
    return int(float(found[-1]) * (1 << 20)) - config["vocab_size"] * config["hidden_size"] * 4


def _row(label: str, values: list[str]) -> str:
    return f"{label:<24}" + " ".join(f"{v:>9}" for v in values)


def _parse_args():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="xla,vllm-cpu", help=", ".join(BACKENDS))
    p.add_argument("--baseline", default=None,
                   help="backend the others are compared with (default: the first)")
    p.add_argument("--request-rates", default="1,4,inf", help="requests/s, comma-separated")
    p.add_argument("--num-prompts", type=int, default=64, help="per request rate")
    p.add_argument("--input-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-warmups", type=int, default=0,
                   help="untimed requests before each rate (they reuse its first prompt)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight (1: batch-1 TTFT and TPOT)")
    p.add_argument("--seed", type=int, default=0, help="prompts of rate i use seed + i")
    p.add_argument("--dtypes", default="xla=float32,vllm-cpu=bfloat16,vllm-cpu-int8=bfloat16",
                   help="BACKEND=DTYPE,...; a backend not named runs --dtype auto")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    p.add_argument("--bandwidth-gbs", type=float, default=45.0,
                   help="memory bandwidth (GB/s) for the batch-1 TPOT floor")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--ready-timeout", type=float, default=1800.0)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json", default=None, help="write all figures here")
    return p.parse_args(argv), extra


def _run_backend(backend: str, dtype: str, args, rates: list[str], extra: list[str],
                 log_dir: str, tokenizer_dir: str) -> dict:
    model_dir = _model_dir(backend)
    port = args.port or free_port()
    cmd, env = _server_cmd(backend, args, dtype, port, model_dir, extra)
    log = os.path.join(log_dir, f"{backend}.server.log")
    print(f"{backend}: starting {' '.join(cmd)}", flush=True)
    with server(cmd, port, log, env, args.ready_timeout) as ready_s:
        print(f"{backend}: ready in {ready_s:.1f}s", flush=True)
        runs = {}
        for i, rate in enumerate(rates):
            runs[rate] = r = _bench(args, port, rate, args.seed + i, tokenizer_dir, log_dir,
                                    backend)
            print(f"{backend}: rate {rate}: {r['completed']} done, {r['failed']} failed, "
                  f"{r['output_throughput']:.1f} output tok/s", flush=True)
    result = dict(dtype=dtype, model=model_dir, ready_s=ready_s, rates=runs,
                  weight_bytes=_weight_bytes(backend, dtype, model_dir, log))
    if backend.startswith("xla"):  # the engine logs every program it builds after warm-up
        with open(log, errors="replace") as f:
            result["compiles_after_warm_up"] = sum(AFTER_WARM_UP in line for line in f)
        print(f"{backend}: {result['compiles_after_warm_up']} XLA programs built after "
              f"warm-up", flush=True)
    return result


def _print_tables(args, rates: list[str], results: dict) -> dict:
    print(f"\n{args.num_prompts} prompts x {args.input_len} tokens in, {args.output_len} out "
          f"(ignore_eos, greedy); latencies in ms")
    print(_row("backend  rate", ["ready s"] + [c[0] for c in COLUMNS]))
    for backend, res in results.items():
        for rate, r in res["rates"].items():
            print(_row(f"{backend}  {rate}", [f"{res['ready_s']:.0f}"]
                       + [fmt.format(r[key]) for _, key, fmt in COLUMNS]))
    base = args.baseline or next(iter(results))
    ratios = {}
    for backend in (b for b in results if b != base and base in results):
        ratios[backend] = {}
        for rate in rates:
            a, b = results[backend]["rates"][rate], results[base]["rates"][rate]
            ratios[backend][rate] = {key: a[key] / b[key] if b[key] else math.nan
                                     for _, key, _ in COLUMNS}
            print(_row(f"{backend}/{base}  {rate}",
                       [f"{results[backend]['ready_s'] / results[base]['ready_s']:.2f}"]
                       + [f"{ratios[backend][rate][key]:.2f}" for _, key, _ in COLUMNS]))
    print(f"\nmedian TPOT against the batch-1 floor (weight bytes / {args.bandwidth_gbs:g} GB/s)")
    print(f"{'backend':<20}{'dtype':<10}{'read MB':>10}{'floor ms':>10}{'TPOT ms':>9}"
          f"{'floor/TPOT':>11}")
    for backend, res in results.items():
        wb = res["weight_bytes"]
        floor_ms = wb / (args.bandwidth_gbs * 1e9) * 1e3 if wb else math.nan
        for rate, r in res["rates"].items():
            tpot = r["median_tpot_ms"]
            print(f"{backend + ' ' + rate:<20}{res['dtype']:<10}{(wb or 0) / 1e6:>10.1f}"
                  f"{floor_ms:>10.2f}{tpot:>9.2f}{floor_ms / tpot if tpot else math.nan:>11.2f}")
    return ratios


def main():
    args, extra = _parse_args()
    dtypes = dict(kv.split("=") for kv in args.dtypes.split(","))
    rates = args.request_rates.split(",")
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backends {unknown} (choose from {', '.join(BACKENDS)})")
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="serving-bench-")
    os.makedirs(log_dir, exist_ok=True)
    tokenizer_dir = str(prepare_default_model())  # one tokenizer: the same prompts for all
    print(f"logs in {log_dir}", flush=True)

    results = {b: _run_backend(b, dtypes.get(b, "auto"), args, rates, extra, log_dir,
                               tokenizer_dir) for b in backends}
    ratios = _print_tables(args, rates, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=dict(vars(args), server_args=extra), backends=results,
                           ratios_over_baseline=ratios), f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
