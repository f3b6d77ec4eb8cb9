"""How the one-row products' bandwidth depends on the size of each call: the same total of
weight bytes (by default 320 x [576, 576] weights, as a SmolLM2-135M step's 30 layers
hold, 66 MB in Q4_1) multiplied in calls of 576, 1536, 6144 or 24576 output rows, each
call's input the previous call's output (as a decode step chains them), one jit. Each call
reads weights of its own ("distinct", from memory), or every call the same one ("same":
in the core's L2, so the time is the kernel's own work per byte). Formats: "q4_1" (the
4-bit kernel, kernels/cpu/quantized_matmul.cc: groups of 32, float16 scales and offsets,
15-bit activations, as the embedded GGUF's layers), "q4_1-1thread" (its build with the
calling thread alone: no spare core, no pool), "bf16" (the one-row bfloat16 kernel,
kernels/cpu/dense_matvec.cc). Variants take turns; medians. Each time less the host's
dispatch of that jit (the median of a no-op jit over the same arguments: with a weight per
call, the "distinct" variants pass hundreds of arrays, 1-2 ms at 576 rows), which a step
overlaps with the previous one. Effective bandwidth = weight bytes / time. --c-model also
runs benchmarks/product_call_model.c (gcc): the 4-bit kernel's inner loop alone over weights
of the same sizes, one thread, and two threads that split every call (what the hardware
gives such calls). A benchmark, not a test.

    PYTHONPATH=. .venv/bin/python benchmarks/product_call_sizes.py --rounds 30 --c-model
"""

import argparse
import os
import pathlib
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.quantized_one_row_builds import _q4_1, _quantized_products
from xla_inference.kernels import cpu_dense

IN = 576
FORMATS = {"q4_1": "default", "q4_1-1thread": "1thread", "bf16": None}


def _weights(fmt, rng, rows, count):
    if fmt == "bf16":
        return [jnp.asarray(rng.standard_normal((rows, IN)) * 0.02, jnp.bfloat16)
                for _ in range(count)]
    return [jax.tree.map(jnp.asarray, _q4_1(rng, rows, IN)) for _ in range(count)]


def _product(fmt):
    if fmt == "bf16":
        assert cpu_dense.available()
        return lambda x, w: cpu_dense.dense_matvec(x.astype(jnp.bfloat16), w)
    return _quantized_products("q4_1", FORMATS[fmt])[0]


def _chain(product, calls):
    """`calls` products, each of the previous output's first IN values (scaled down)."""
    def step(ws, x):
        for i in range(calls):
            x = x + 0.001 * product(x, ws[i % len(ws)])[:, :IN]
        return x
    return jax.jit(step)


def _c_model(all_rows, total_rows):
    """benchmarks/product_call_model.c (built once) over weights of each of `all_rows` x IN,
    in Q4_1's values' bytes (4 bits a weight)."""
    source = pathlib.Path(__file__).with_name("product_call_model.c")
    with tempfile.TemporaryDirectory() as tmp:
        binary = pathlib.Path(tmp) / "model"
        subprocess.run(["gcc", "-O2", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-pthread",
                        "-o", str(binary), str(source)], check=True)
        for rows in all_rows:
            out = subprocess.run([str(binary), str(rows * IN // 2 // 1024), str(total_rows // rows)],
                                 check=True, capture_output=True, text=True).stdout
            print(out.strip(), flush=True)


def _dispatch(weights, x):
    """A jit's host time for these arguments: a no-op over them, not waited for."""
    noop = jax.jit(lambda ws, x: x, keep_unused=True)
    jax.block_until_ready(noop(weights, x))
    times = []
    for _ in range(20):
        t = time.perf_counter()
        out = noop(weights, x)
        times.append(time.perf_counter() - t)
        jax.block_until_ready(out)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--total-rows", type=int, default=320 * IN,
                        help="output rows over all calls (320 x 576: 66 MB of Q4_1)")
    parser.add_argument("--rows", type=int, nargs="+", default=[576, 1536, 6144, 24576])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--c-model", action="store_true",
                        help="also the C model of the 4-bit loop (an AVX-512 VNNI CPU, gcc)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, IN)), jnp.float32)
    variants = {}  # name -> (jitted chain, weights, weight bytes, calls)
    for fmt in args.formats:
        product = _product(fmt)
        for rows in args.rows:
            calls = args.total_rows // rows
            weights = _weights(fmt, rng, rows, calls)
            per_call = sum(a.nbytes for a in jax.tree.leaves(weights[0]))
            variants[f"{fmt} {rows} distinct"] = (_chain(product, calls), weights,
                                                  per_call * calls, calls)
        rows = args.rows[0]
        calls = args.total_rows // rows
        weights = _weights(fmt, rng, rows, 1)
        per_call = sum(a.nbytes for a in jax.tree.leaves(weights[0]))
        variants[f"{fmt} {rows} same"] = (_chain(product, calls), weights, per_call * calls, calls)
    for step, weights, _, _ in variants.values():
        jax.block_until_ready(step(weights, x))
    times = {name: [] for name in variants}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, (step, weights, _, _) in variants.items():
            t = time.perf_counter()
            jax.block_until_ready(step(weights, x))
            times[name].append(time.perf_counter() - t)
    print(f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}; medians of {args.rounds}, "
          "variants alternated; times less the dispatch")
    for name, (_, weights, total, calls) in variants.items():
        dispatch = _dispatch(weights, x)
        m = statistics.median(times[name]) - dispatch
        print(f"{name:26s} {calls:4d} calls {total / 1e6:6.1f} MB  {m * 1e3:7.2f} ms "
              f"(+{dispatch * 1e3:4.2f} dispatch)  {m / calls * 1e6:7.1f} us/call  "
              f"{total / m / 1e9:5.1f} GB/s", flush=True)
    if args.c_model:
        _c_model(args.rows, args.total_rows)


if __name__ == "__main__":
    main()
