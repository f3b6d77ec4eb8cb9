"""The AMX bfloat16 product of a few rows (kernels/cpu_dense.dense_matmul, cpu/dense_matmul.cc)
against XLA's product, on the host CPU: per SmolLM2-135M weight shape and row count (in
cache, each call alone), and in the engine's compiled step (SmolLM2-135M, bfloat16
projections: a batch-64 decode step, where every weight comes from memory), the two steps
taking turns. Medians; speed ratios (>1: the kernel faster). A benchmark, not a test.

    PYTHONPATH=. .venv/bin/python benchmarks/dense_matmul.py --rows 2 16 64 128 256 --repeats 9
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from _engine_steps import BLOCK, CONTEXT, alternated_step_seconds, decode_requests, load_variant

from xla_inference.kernels import cpu_dense
from xla_inference.layers import linear
from xla_inference.runner.build import build_engine
from xla_inference.runner.engine import EngineConfig

SHAPES = {"q/o": (576, 576), "k/v": (192, 576), "gate/up": (1536, 576), "down": (576, 1536),
          "head": (49152, 576)}


def _median_seconds(fn, x, w, repeats):
    jax.block_until_ready(fn(x, w))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x, w))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def shapes(rows_list, repeats):
    xla = jax.jit(lambda x, w: jnp.einsum("ti,oi->to", x, w, preferred_element_type=jnp.float32))
    amx = jax.jit(cpu_dense.dense_matmul)
    rng = np.random.default_rng(0)
    for rows in rows_list:
        for name, (out, inp) in SHAPES.items():
            x = jnp.asarray(rng.standard_normal((rows, inp)), jnp.bfloat16)
            w = jnp.asarray(rng.standard_normal((out, inp)) * 0.05, jnp.bfloat16)
            a, b = _median_seconds(xla, x, w, repeats), _median_seconds(amx, x, w, repeats)
            gflop = 2 * rows * out * inp / 1e9
            print(f"rows {rows:4d} {name:8s} xla {a * 1e3:8.3f} ms {gflop / a:5.0f} GFLOP/s | "
                  f"kernel {b * 1e3:8.3f} ms {gflop / b:5.0f} GFLOP/s | {a / b:.2f}x", flush=True)


def engine_step(repeats, steps):
    ecfg = EngineConfig(num_blocks=64 * (CONTEXT // BLOCK + 2) + 256, block_size=BLOCK,
                        max_num_tokens=2048, max_num_seqs=64, max_model_len=1024)
    rng = np.random.default_rng(0)
    engines = {}
    for name, max_rows in (("xla", 1), ("kernel", linear.NATIVE_MATMUL_MAX_ROWS)):
        saved, linear.NATIVE_MATMUL_MAX_ROWS = linear.NATIVE_MATMUL_MAX_ROWS, max_rows
        try:  # the choice is made when the step is traced: warm each engine under its own
            engines[name] = build_engine(load_variant("bf16"), ecfg)
            for batch in steps:
                jax.block_until_ready(engines[name].forward(decode_requests(batch, rng, 1)).logits)
        finally:
            linear.NATIVE_MATMUL_MAX_ROWS = saved
    for batch in steps:
        times = alternated_step_seconds(engines, decode_requests(batch, rng, 1), repeats)
        a, b = statistics.median(times["xla"]), statistics.median(times["kernel"])
        print(f"decode step, batch {batch}: xla {a * 1e3:.1f} ms | kernel {b * 1e3:.1f} ms "
              f"| {a / b:.2f}x", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 16, 64, 128, 256])
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--skip-shapes", action="store_true")
    args = parser.parse_args()
    assert cpu_dense.matmul_available(), "no AMX kernel on this machine"
    if not args.skip_shapes:
        shapes(args.rows, args.repeats)
    engine_step(args.repeats, args.decode_batches)


if __name__ == "__main__":
    main()
