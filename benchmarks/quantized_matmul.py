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


def _wide(bits, group_size, isa, zero_point=0):
    def product(x, values, scales, offsets):
        return cpu_quantized.quantized_matmul_wide(x, values, scales, offsets, bits=bits,
                                                   group_size=group_size,
                                                   zero_point=zero_point, isa=isa)
    return product


def _xla_dequantized(bits, group_size):
    """What product.py did for wide steps before the wide entry: XLA dequantizes the tiles
    into bfloat16 and runs its bfloat16 product."""
    def product(x, values, scales, offsets):
        tiles, half, _ = values.shape
        per_chunk = 2 if bits == 8 else 4
        v = values.astype(jnp.int32).reshape(tiles, half, 16, 2)  # [ot, c, r, j]
        if bits == 4:
            v = jnp.stack([v & 15, v >> 4], axis=-2).reshape(tiles, half, 16, 4)
            v = v.reshape(tiles, half, 16, 2, 2).transpose(0, 1, 2, 4, 3).reshape(
                tiles, half, 16, 4)
        q = v.transpose(0, 2, 1, 3).reshape(tiles * 16, half * per_chunk).astype(jnp.float32)
        groups = scales.shape[1]
        s = scales.astype(jnp.float32).transpose(0, 2, 1).reshape(tiles * 16, groups)
        w = q.reshape(tiles * 16, groups, -1) * s[..., None]
        if offsets is not None:
            o = offsets.astype(jnp.float32).transpose(0, 2, 1).reshape(tiles * 16, groups)
            w = w + o[..., None]
        w = w.reshape(tiles * 16, -1).astype(jnp.bfloat16)
        return jnp.einsum("ti,oi->to", x.astype(jnp.bfloat16), w,
                          preferred_element_type=jnp.float32)
    return product


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


def _wide_cases(cases, rng, args, x):
    for bits, group_size in ((8, 96), (4, 32)):
        weights = _tile_operands(rng, args.out, args.n, bits, group_size, np.float16)
        name = f"int{bits} g{group_size}"
        cases[f"{name} XLA dequant+bf16"] = (jax.jit(_xla_dequantized(bits, group_size)),
                                             (x, *weights))
        cases[f"{name} narrow fused"] = (jax.jit(_fused(bits, group_size)), (x, *weights))
        for isa in cpu_quantized.WIDE_ISAS[1:]:
            if cpu_quantized.WIDE_ISAS.index(isa) <= cpu_quantized.WIDE_ISAS.index(
                    cpu_quantized.wide_isa()):
                cases[f"{name} wide {isa}"] = (jax.jit(_wide(bits, group_size, isa)),
                                               (x, *weights))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=int, default=8 * 1536)
    parser.add_argument("--in", dest="n", type=int, default=576)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=20, help="calls per case per round")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4], help="values of T")
    parser.add_argument("--only", default="", help="the cases whose name contains this")
    parser.add_argument("--wide", action="store_true",
                        help="wide-step cases (the wide entry on each path, XLA's dequantize "
                             "and product, the narrow kernel's fused entry) instead of the "
                             "narrow kernel's")
    args = parser.parse_args()
    assert cpu_quantized.available(), "the native kernel did not build"
    print(f"weight [{args.out}, {args.n}]; VNNI path: {cpu_quantized.uses_vnni()}; "
          f"wide path: {cpu_quantized.wide_isa()}; "
          f"{jax.device_count()} device(s); medians of {args.rounds} x {args.calls} calls")
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((args.out, args.n)), jnp.bfloat16)
    for T in args.rows:
        x = jnp.asarray(rng.standard_normal((T, args.n)), jnp.float32)
        xq = jnp.asarray(rng.integers(-16383, 16384, (T, args.n)), jnp.int16)
        x_scale = jnp.full((T,), 1 / 16383, jnp.float32)
        cases = {"bf16 XLA": (jax.jit(_bf16), (x, w))}
        if args.wide:
            _wide_cases(cases, rng, args, x)
        for bits, group_size in (() if args.wide else ((8, 96), (8, 32), (4, 32), (4, 96))):
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
