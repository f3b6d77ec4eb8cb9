"""Decode-sized quantized matrix products on the CPU: the native kernel
(kernels/cpu_quantized.py) with int8 and int4 weights against XLA's bfloat16 product of the
same shape. Prints the median time per product; a benchmark, not a test.

Two timings per case: "call" is one jitted call per product (what a step pays, dispatch
included); "chained" runs 16 dependent products in one jitted call and divides (the kernel's
own time). The activations are quantized to int16 per row inside the jitted function, as the
quantized linear layer does.

    .venv/bin/python benchmarks/quantized_matmul.py [--out 12288] [--in 576] [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.kernels import cpu_quantized

CHAIN = 16


def _tile_operands(rng, out, n, bits, group_size):
    """Random int weights straight in the tile layout (the values do not matter for time)."""
    per_chunk = 2 if bits == 8 else 4
    tiles, groups = out // 16, n // group_size
    dtype = np.int8 if bits == 8 else np.uint8
    values = rng.integers(0, 256, (tiles, n // per_chunk, 32), dtype=np.uint8).view(dtype)
    scales = rng.uniform(1e-3, 2e-3, (tiles, groups, 16)).astype(np.float32)
    offsets = -8 * scales if bits == 4 else None
    return jnp.asarray(values), jnp.asarray(scales), None if offsets is None else jnp.asarray(offsets)


def _quantized(bits, group_size):
    def product(x, values, scales, offsets):
        x_scale = jnp.maximum(jnp.max(jnp.abs(x), axis=1), 1e-30) / 16383
        xq = jnp.round(x / x_scale[:, None]).astype(jnp.int16)
        y = cpu_quantized.quantized_matmul(xq, x_scale, values, scales, offsets, bits=bits,
                                           group_size=group_size)
        return y
    return product


def _bf16(x, w):
    return jnp.einsum("ti,io->to", x.astype(jnp.bfloat16), w.T, preferred_element_type=jnp.float32)


def _chained(product, n):
    """CHAIN products, each x depending on the last output (no hoisting or overlap)."""
    def run(x, *weights):
        def body(_, x):
            y = product(x, *weights)
            return x + 1e-30 * y[:, :n]
        return jax.lax.fori_loop(0, CHAIN, body, x)
    return jax.jit(run)


def _median_ms(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=int, default=8 * 1536)
    parser.add_argument("--in", dest="n", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    assert cpu_quantized.available(), "the native kernel did not build"
    print(f"weight [{args.out}, {args.n}]; VNNI path: {cpu_quantized.uses_vnni()}; "
          f"{jax.device_count()} device(s)")
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((args.out, args.n)), jnp.bfloat16)
    cases = [("bf16 XLA", _bf16, (w,))]
    for bits, group_size in ((8, 96), (8, 32), (4, 32), (4, 96)):
        cases.append((f"int{bits} g{group_size}", _quantized(bits, group_size),
                      _tile_operands(rng, args.out, args.n, bits, group_size)))
    for T in (1, 4):
        x = jnp.asarray(rng.standard_normal((T, args.n)), jnp.float32)
        for name, product, weights in cases:
            call = _median_ms(jax.jit(product), (x, *weights), args.repeats)
            chained = _median_ms(_chained(product, args.n), (x, *weights),
                                 max(1, args.repeats // CHAIN)) / CHAIN
            print(f"T={T} {name:10s} call {call:6.3f} ms   chained {chained:6.3f} ms")


if __name__ == "__main__":
    main()
