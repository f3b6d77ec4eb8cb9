"""Mixed workload, one run: short requests decode (streamed) while long prompts arrive;
the short streams' time per output token (gaps between streamed tokens, p50 / p99) when
everything goes to one server (the decode server, used directly: it prefills the long
prompts itself) against everything through the disaggregated proxy (prefill server, then
decode server fetching the pages). Both modes on the same pair of servers started by
`xla-inference disagg-serve`, alternated, `--repeats` rounds each.

    .venv/bin/python benchmarks/kv_network_mixed.py       # SmolLM2-135M, float32
"""

import argparse
import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _stream_gaps(url, model, prompt, max_tokens) -> list[float]:
    """Seconds between consecutive streamed tokens of one request (first token excluded)."""
    body = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                ignore_eos=True, stream=True)
    stamps = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _complete(url, model, prompt, max_tokens) -> None:
    body = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                ignore_eos=True)
    httpx.post(f"{url}/v1/completions", json=body, timeout=600).raise_for_status()


def _round(url, model, rng, args) -> list[float]:
    shorts = [rng.integers(100, 40000, size=args.short_len).tolist() for _ in range(args.num_short)]
    longs = [rng.integers(100, 40000, size=args.long_len).tolist() for _ in range(args.num_long)]
    with concurrent.futures.ThreadPoolExecutor(args.num_short + args.num_long) as pool:
        streams = [pool.submit(_stream_gaps, url, model, p, args.short_tokens) for p in shorts]
        time.sleep(args.long_delay)
        longs_done = [pool.submit(_complete, url, model, p, 4) for p in longs]
        gaps = [g for s in streams for g in s.result()]
        for done in longs_done:
            done.result()
    return gaps


def main() -> None:
    import numpy as np

    from xla_inference.loading.default_model import prepare_default_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--num-short", type=int, default=4)
    parser.add_argument("--short-len", type=int, default=32)
    parser.add_argument("--short-tokens", type=int, default=48)
    parser.add_argument("--num-long", type=int, default=2)
    parser.add_argument("--long-len", type=int, default=960)
    parser.add_argument("--long-delay", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = str(prepare_default_model())
    ports = dict(proxy=18811, prefill=18812, decode=18813, kv=18814)
    cmd = [sys.executable, "-m", "xla_inference.cli", "disagg-serve", "--port", str(ports["proxy"]),
           "--prefill-port", str(ports["prefill"]), "--decode-port", str(ports["decode"]),
           "--kv-port", str(ports["kv"]), "--", "--model", model, "--dtype", "float32",
           "--max-model-len", "1024", "--max-num-seqs", "8", "--max-num-batched-tokens", "256",
           "--kv-cache-memory-bytes", str(256 << 20)]
    log = open("/tmp/kv_network_mixed.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    urls = dict(one_server=f"http://127.0.0.1:{ports['decode']}",
                disaggregated=f"http://127.0.0.1:{ports['proxy']}")
    try:
        deadline = time.monotonic() + 1800
        while "disagg-serve: prefill" not in Path("/tmp/kv_network_mixed.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "disagg-serve failed"
            time.sleep(2)
        time.sleep(2)  # the proxy's port
        rng = np.random.default_rng(0)
        for url in urls.values():  # untimed: first runs of each program
            _round(url, model, rng, args)
        gaps = {mode: [] for mode in urls}
        for r in range(args.repeats):
            order = list(urls) if r % 2 == 0 else list(urls)[::-1]
            for mode in order:
                gaps[mode] += _round(urls[mode], model, rng, args)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    result = dict(model=model, load_average=os.getloadavg()[0], **vars(args))
    for mode, values in gaps.items():
        values = sorted(values)
        result[f"{mode}_tpot_p50_ms"] = 1e3 * statistics.median(values)
        result[f"{mode}_tpot_p99_ms"] = 1e3 * values[min(len(values) - 1, int(0.99 * len(values)))]
    result["p99_ratio_disaggregated_over_one_server"] = (result["disaggregated_tpot_p99_ms"]
                                                         / result["one_server_tpot_p99_ms"])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
