"""One SmolLM2 projection at a time, at wide-step row counts: XLA's bfloat16 product on a
dense bfloat16 weight (layers/linear.project, as the bfloat16 model runs it) against
quantization/product.quantized_project on the same shape with int4 groups of 32 with
float16 scales and offsets (GGUF Q4_1's layout), per-channel int8 weight-only (online
`--quantization int8`) and W8A8 int8 (int8 activations), float32 activations in and out (the CPU's
precision policy for dtype=bfloat16: bfloat16 projection matrices, float32 elsewhere).
The cases take turns, round after round; medians and fastest calls (the latter nearer the
unshared machine), each quantized time as a speed ratio to bfloat16 in the same run (>1:
faster). A benchmark, not a test.

    PYTHONPATH=. .venv/bin/python benchmarks/quantized_wide_shapes.py --rows 16 64 256 2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.layers.linear import project
from xla_inference.quantization.groups import INT4, INT8, INT8_ACTIVATIONS, GroupQuant
from xla_inference.quantization.packed import pack

SHAPES = {"gate/up": (1536, 576), "down": (576, 1536), "q/o": (576, 576), "k/v": (192, 576)}


def _int4_q4_1(rng, out, n):
    groups = n // 32
    scales = rng.uniform(1e-3, 2e-3, (out, groups)).astype(np.float16).astype(np.float32)
    offsets = (-8 * scales).astype(np.float16).astype(np.float32)
    return pack(GroupQuant(rng.integers(0, 16, (out, n)).astype(np.uint8), scales, offsets,
                           INT4, 32), "bfloat16")


def _int8(rng, out, n, activations=None):
    kwargs = {"activations": activations} if activations else {}
    return pack(GroupQuant(rng.integers(-127, 128, (out, n)).astype(np.int8),
                           rng.uniform(1e-3, 2e-3, (out, 1)), None, INT8, n, **kwargs),
                "bfloat16")


def _cases(rng, out, n):
    return {"bf16": jnp.asarray(rng.standard_normal((out, n)) * 0.02, jnp.bfloat16),
            "int4 g32": _int4_q4_1(rng, out, n),
            "int8 w-only": _int8(rng, out, n),
            "int8 W8A8": _int8(rng, out, n, INT8_ACTIVATIONS)}


def _line(head, times, summary):
    """Times summarised (median or fastest) and each as a speed ratio to bfloat16's."""
    base = summary(times["bf16"])
    line = f"{head} bf16 {base * 1e3:7.3f} ms"
    for case in list(times)[1:]:
        t = summary(times[case])
        line += f" | {case} {t * 1e3:7.3f} ({base / t:.2f}x)"
    return line


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256, 2048])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=0, help="calls per case per round "
                        "(0: about 20 ms of bfloat16 work)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    step = jax.jit(lambda x, w: project(x, w))
    for name in args.shapes:
        out, n = SHAPES[name]
        weights = _cases(rng, out, n)
        for rows in args.rows:
            x = jnp.asarray(rng.standard_normal((rows, n)), jnp.float32)
            for w in weights.values():
                jax.block_until_ready(step(x, w))
            calls = args.calls or max(1, int(20e-3 / (2 * rows * out * n / 2e11)))
            times = {case: [] for case in weights}
            for _ in range(args.rounds):
                for case, w in weights.items():
                    start = time.perf_counter()
                    for _ in range(calls):
                        y = step(x, w)
                    jax.block_until_ready(y)
                    times[case].append((time.perf_counter() - start) / calls)
            print(_line(f"{name:8s} [{out}, {n}] T={rows:5d}", times, statistics.median)
                  + "\n" + _line(" " * 26 + "(fastest)", times, min), flush=True)


if __name__ == "__main__":
    main()
