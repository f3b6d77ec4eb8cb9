"""Server start-up time of xla-inference, cold and warm compilation cache.

Launches the README's serve command (`xla-inference serve`, the default SmolLM2 model, the
README's defaults except a 1 GiB KV cache) --runs times (default 2) with XLA_INFERENCE_CACHE
pointing at one compilation cache directory: a fresh temp dir by default, so the first run
compiles every bucket (cold) and the next ones load them from JAX's persistent cache (warm).
Each run is timed from launch until /health answers, then stopped; its log gives the warm-up
time and each bucket's compile time.

    .venv/bin/python benchmarks/startup.py

It prints a table, one column per run (cold/warm: whether the cache held any compiled
program at launch): seconds to ready, warm-up seconds, seconds per bucket and the number of
cache entries after the run. `--cache-dir DIR` reuses DIR (so a later invocation shows the
cache surviving restarts); `--json PATH` writes the figures; extra server flags follow `--`
(`... startup.py -- --max-model-len 512 --max-num-batched-tokens 256`).
"""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile

from _server import free_port, server, xla_serve_cmd

from xla_inference.loading.default_model import DEFAULT_MODEL_NAME, prepare_default_model

BUCKET = re.compile(r"compiled bucket (\d+)/(\d+) \(tokens=(\d+), seqs=(\d+)\) in ([\d.]+)s")
WARMUP = re.compile(r"warm-up done in ([\d.]+)s")


def _cache_entries(cache_root: str) -> int:
    path = os.path.join(cache_root, "jax-compilation-cache")
    return len(os.listdir(path)) if os.path.isdir(path) else 0


def _parse_log(path: str) -> dict:
    with open(path, errors="replace") as f:
        text = f.read()
    warm = WARMUP.search(text)
    return dict(warmup_s=float(warm.group(1)) if warm else None,
                buckets=[dict(tokens=int(t), seqs=int(s), seconds=float(sec))
                         for _, _, t, s, sec in BUCKET.findall(text)])


def _link_model(cache_root: str) -> None:
    """Point the cache's model directory at the already prepared model (no rebuild)."""
    link = os.path.join(cache_root, "models", DEFAULT_MODEL_NAME)
    if not os.path.exists(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(prepare_default_model(), link)


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--cache-dir", default=None,
                   help="XLA_INFERENCE_CACHE for the runs (default: a fresh temp dir, removed)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--ready-timeout", type=float, default=1800.0)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    fresh = args.cache_dir is None
    cache_root = tempfile.mkdtemp(prefix="xla-cache-") if fresh else args.cache_dir
    os.makedirs(cache_root, exist_ok=True)
    _link_model(cache_root)  # prepared outside the timed runs, in the default cache
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="startup-bench-")
    os.makedirs(log_dir, exist_ok=True)
    env = dict(os.environ, XLA_INFERENCE_CACHE=cache_root)
    env.pop("VLLM_PLUGINS", None)
    print(f"cache {cache_root}{' (fresh)' if fresh else ''}; logs in {log_dir}", flush=True)

    runs = []
    try:
        for i in range(args.runs):
            state = "warm" if _cache_entries(cache_root) else "cold"
            port = args.port or free_port()
            cmd = xla_serve_cmd("--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                                "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes),
                                *extra)
            log = os.path.join(log_dir, f"run{i + 1}-{state}.server.log")
            print(f"run {i + 1} ({state}): {' '.join(cmd)}", flush=True)
            with server(cmd, port, log, env, args.ready_timeout) as ready_s:
                print(f"run {i + 1} ({state}): ready in {ready_s:.1f}s", flush=True)
            runs.append(dict(cache=state, ready_s=ready_s, **_parse_log(log),
                             cache_entries=_cache_entries(cache_root), log=log))
    finally:
        if fresh:
            shutil.rmtree(cache_root, ignore_errors=True)

    def row(label, values):
        print(f"{label:<34}" + "".join(f"{v:>10}" for v in values))

    print()
    row("run", [f"{i + 1} {r['cache']}" for i, r in enumerate(runs)])
    row("ready (s)", [f"{r['ready_s']:.1f}" for r in runs])
    row("warm-up (s)", [f"{r['warmup_s']:.1f}" if r["warmup_s"] is not None else "-"
                        for r in runs])
    for b in range(max(len(r["buckets"]) for r in runs)):
        first = next(r["buckets"][b] for r in runs if len(r["buckets"]) > b)
        row(f"bucket {b + 1} (tokens={first['tokens']}, seqs={first['seqs']})",
            [f"{r['buckets'][b]['seconds']:.1f}" if len(r["buckets"]) > b else "-"
             for r in runs])
    row("cache entries after", [r["cache_entries"] for r in runs])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cache_dir=cache_root, fresh_cache=fresh, server_args=extra,
                           kv_cache_memory_bytes=args.kv_cache_memory_bytes, runs=runs),
                      f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
