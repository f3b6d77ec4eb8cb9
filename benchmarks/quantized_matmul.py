"""Decode-sized quantized matrix products on the CPU: the native kernel
(kernels/cpu_quantized.py) with int8 and int4 weights against XLA's bfloat16 product of the
same shape. Prints median times per product; a benchmark, not a test.

Each product is one jitted call, timed to its result ("call": float32 activations quantized
to int16 per row by XLA, then the kernel's int16 entry; "fused": float32 activations to the
kernel's float entry, which quantizes them itself, as a quantized linear layer does;
"kernel": given int16 activations, the custom call alone), with scales and offsets stored
as float32 ("f32") or float16 ("f16"), or 4-bit symmetric weights with float16 scales and
the zero point 8 in place of offsets ("z8": GPTQ's, compressed-tensors' symmetric and GGUF
Q4_0's weights as packed). The cases take turns, round after round, so that a
burst of other work on a shared machine falls on all of them alike.

    .venv/bin/python benchmarks/quantized_matmul.py [--out 12288] [--in 576] [--rounds 20]
        [--rows 1 4] [--only int4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.kernels import cpu_quantized
from xla_inference.quantization.product import FLOAT_ACTIVATION_LEVELS


def _tile_operands(rng, out, n, bits, group_size, group_dtype):
    """Random int weights straight in the tile layout (the values do not matter for time),
    scales and offsets (4-bit) in `group_dtype`."""
    per_chunk = 2 if bits == 8 else 4
    tiles, groups = out // 16, n // group_size
    dtype = np.int8 if bits == 8 else np.uint8
    values = rng.integers(0, 256, (tiles, n // per_chunk, 32), dtype=np.uint8).view(dtype)
    scales = rng.uniform(1e-3, 2e-3, (tiles, groups, 16)).astype(group_dtype)
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


def _fused(bits, group_size, zero_point=0):
    def product(x, values, scales, offsets):
        return cpu_quantized.quantized_matmul_float(x, values, scales, offsets, bits=bits,
                                                    group_size=group_size,
                                                    levels=FLOAT_ACTIVATION_LEVELS,
                                                    zero_point=zero_point)
    return product


def _bf16(x, w):
    return jnp.einsum("ti,io->to", x.astype(jnp.bfloat16), w.T, preferred_element_type=jnp.float32)


def _kernel_only(bits, group_size):
    def product(xq, x_scale, values, scales, offsets):
        return cpu_quantized.quantized_matmul(xq, x_scale, values, scales, offsets, bits=bits,
                                              group_size=group_size)
    return product


def _time_ms(fn, args, calls):
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - start))
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=int, default=8 * 1536)
    parser.add_argument("--in", dest="n", type=int, default=576)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=20, help="calls per case per round")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4], help="values of T")
    parser.add_argument("--only", default="", help="the cases whose name contains this")
    args = parser.parse_args()
    assert cpu_quantized.available(), "the native kernel did not build"
    print(f"weight [{args.out}, {args.n}]; VNNI path: {cpu_quantized.uses_vnni()}; "
          f"{jax.device_count()} device(s); medians of {args.rounds} x {args.calls} calls")
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((args.out, args.n)), jnp.bfloat16)
    for T in args.rows:
        x = jnp.asarray(rng.standard_normal((T, args.n)), jnp.float32)
        xq = jnp.asarray(rng.integers(-16383, 16384, (T, args.n)), jnp.int16)
        x_scale = jnp.full((T,), 1 / 16383, jnp.float32)
        cases = {"bf16 XLA": (jax.jit(_bf16), (x, w))}
        for bits, group_size in ((8, 96), (8, 32), (4, 32), (4, 96)):
            for dtype in ("f32", "f16"):
                weights = _tile_operands(rng, args.out, args.n, bits, group_size,
                                         np.float32 if dtype == "f32" else np.float16)
                name = f"int{bits} g{group_size} {dtype}"
                cases[f"{name} call"] = (jax.jit(_quantized(bits, group_size)), (x, *weights))
                cases[f"{name} fused"] = (jax.jit(_fused(bits, group_size)), (x, *weights))
                cases[f"{name} kernel"] = (jax.jit(_kernel_only(bits, group_size)),
                                           (xq, x_scale, *weights))
            if bits == 4:
                values, scales, _ = weights  # float16 ones
                cases[f"int4 g{group_size} z8 fused"] = (
                    jax.jit(_fused(bits, group_size, zero_point=8)), (x, values, scales, None))
        cases = {name: case for name, case in cases.items() if args.only in name}
        for fn, fn_args in cases.values():
            jax.block_until_ready(fn(*fn_args))
        times = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (fn, fn_args) in cases.items():
                times[name] += _time_ms(fn, fn_args, args.calls)
        for name, t in times.items():
            print(f"T={T} {name:20s} {statistics.median(t):6.3f} ms "
                  f"(25%: {np.percentile(t, 25):.3f}, min {min(t):.3f})")


if __name__ == "__main__":
    main()
