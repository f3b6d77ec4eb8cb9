"""The MoE grouped product on the host CPU: XLA's jax.lax.ragged_dot against
kernels/xla_gmm.gmm (the work-list loop layers/moe.py takes on one device), with every row
in a group and with half the rows outside every group (a step's padding routed to expert
-1), same shapes. XLA's CPU lowers ragged_dot to one dense product of every row by every
expert (masked), so its time depends on neither the groups nor the padding; the loop
multiplies each row by its own expert only, and skips rows outside every group. Minimum of
`--repeats` calls each, after a warm-up. A benchmark, not a test.

    PYTHONPATH=. .venv/bin/python benchmarks/moe_grouped_cpu.py --repeats 5
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.kernels import xla_gmm

# (rows M = tokens x k, experts E, K, N): a Mixtral-like 8 experts; Qwen3-30B-A3B's 128
# experts, gate/up [2048 -> 768] scaled down to K 1024 / N 384 to fit the 2-core machine.
# 64 rows: a decode step of 8 tokens (k = 8), fewer rows than experts (one row an item).
SHAPES = [(512, 8, 512, 384), (512, 16, 256, 256), (64, 128, 1024, 384),
          (512, 128, 1024, 384), (2048, 128, 1024, 384)]


def _seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    ragged = jax.jit(jax.lax.ragged_dot)
    loop = jax.jit(xla_gmm.gmm)
    print("rows experts K N | ms: ragged_dot all-in / half-out | loop all-in / half-out")
    for m, e, k, n in SHAPES:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
        w = jnp.asarray(rng.standard_normal((e, k, n)) / np.sqrt(k), dtype)
        times = {}
        for name, rows in (("all", m), ("half", m // 2)):
            sizes = jnp.asarray(np.bincount(rng.integers(0, e, rows), minlength=e), jnp.int32)
            for label, fn in (("ragged", ragged), ("loop", loop)):
                times[label, name] = 1e3 * _seconds(fn, (x, w, sizes), args.repeats)
            diff = np.abs(np.asarray(ragged(x, w, sizes), np.float32)
                          - np.asarray(loop(x, w, sizes), np.float32)).max()
            assert diff < (1e-4 if dtype == jnp.float32 else 5e-2), diff
        print(f"{m} {e} {k} {n} {dtype.name} | {times['ragged', 'all']:.1f} / "
              f"{times['ragged', 'half']:.1f} | {times['loop', 'all']:.1f} / "
              f"{times['loop', 'half']:.1f}", flush=True)


if __name__ == "__main__":
    main()
