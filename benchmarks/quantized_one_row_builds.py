"""The one-row quantized products of a SmolLM2-135M decode step (30 layers: q/k/v in one
multi call, o, gate/up in one multi call, down; then the [49152, 576] LM head), chained in
one jit as the engine's step chains them, for builds of the native kernel
(kernels/cpu/quantized_matmul.cc) with other compile-time settings, against the bfloat16
one-row kernel (kernels/cpu/dense_matvec.cc) on dense weights of the same shapes. Formats:
"q4_1" (4-bit groups of 32, float16 scales and offsets, 15-bit activations; the LM head
Q8_0: int8 groups of 32, float16 scales), as the embedded GGUF; "int8" (per-channel int8
weights, 15-bit activations, the LM head too), as --quantization int8; "w8a8" (the same
weights, int8 activations), as compressed-tensors W8A8 int8. Every build multiplies
the SAME arrays; the variants' calls take turns; medians and fastest, and the process CPU
time per step. A benchmark, not a test.

    PYTHONPATH=. .venv/bin/python benchmarks/quantized_one_row_builds.py --calls 40 \\
        --variants q4_1:old q4_1:default int8:old int8:default
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.dense_step_products import layer_chain_step
from xla_inference.kernels import cpu_dense, cpu_quantized, native
from xla_inference.quantization.groups import (FLOAT_ACTIVATIONS, INT4, INT8, INT8_ACTIVATIONS,
                                               GroupQuant)
from xla_inference.quantization.packed import pack

HIDDEN, INTERMEDIATE, KV, VOCAB = 576, 1536, 192, 49152
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
          (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]

# build name -> extra compile flags of quantized_matmul.cc (() : the default build)
BUILDS = {
    "default": (),  # the next block's weights and scales prefetched into L2
    # the earlier prefetching: 1 KiB ahead within each tile, scales 4 groups ahead, into L1
    "old": ("-DXLA_INFERENCE_QMM_PREFETCH_BLOCKS=0",
            "-DXLA_INFERENCE_QMM_PREFETCH_HINT=_MM_HINT_T0"),
    "next-t0": ("-DXLA_INFERENCE_QMM_PREFETCH_HINT=_MM_HINT_T0",),  # the next block, into L1
    "next2": ("-DXLA_INFERENCE_QMM_PREFETCH_BLOCKS=2",),  # 2 blocks ahead, into L2
    "1thread": ("-DXLA_INFERENCE_QMM_MULTI_BYTES_PER_THREAD=(1ll<<40)",  # the calling thread
                "-DXLA_INFERENCE_QMM_BYTES_PER_THREAD=(1ll<<40)", "-DXLA_INFERENCE_SPARE_CORE=0"),
    "nospare": ("-DXLA_INFERENCE_SPARE_CORE=0",),  # no spare core (kernels/cpu/spare_core.h)
    "spare-normal": ("-DXLA_INFERENCE_SPARE_CORE_IDLE=0",),  # the spare core not SCHED_IDLE
    # one-row 4-bit products on AVX2 widening the weights (no split x: tile_nibbles_split)
    "widen": ("-DXLA_INFERENCE_QMM_SPLIT=0",),
    "widen-1thread": ("-DXLA_INFERENCE_QMM_SPLIT=0", "-DXLA_INFERENCE_QMM_MULTI_BYTES_PER_THREAD=(1ll<<40)",
                      "-DXLA_INFERENCE_QMM_BYTES_PER_THREAD=(1ll<<40)", "-DXLA_INFERENCE_SPARE_CORE=0"),
    "256k": ("-DXLA_INFERENCE_QMM_MULTI_BYTES_PER_THREAD=(1<<18)",  # the pool from 256 KiB
             "-DXLA_INFERENCE_QMM_BYTES_PER_THREAD=(1<<18)", "-DXLA_INFERENCE_SPARE_CORE=0"),
}


def _q4_1(rng, out, n):
    groups = n // 32
    half = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731
    return pack(GroupQuant(rng.integers(0, 16, (out, n)).astype(np.uint8),
                           half(rng.uniform(1e-3, 2e-3, (out, groups))),
                           half(-8e-3 * rng.uniform(0.5, 1, (out, groups))), INT4, 32),
                "bfloat16")


def _q8_0(rng, out, n):
    half = rng.uniform(1e-3, 2e-3, (out, n // 32)).astype(np.float16).astype(np.float32)
    return pack(GroupQuant(rng.integers(-127, 128, (out, n)).astype(np.int8), half, None,
                           INT8, 32), "bfloat16")


def _int8(rng, out, n, activations=FLOAT_ACTIVATIONS):
    """Per-channel int8 (one float32 scale a row, split into groups of at most 128)."""
    return pack(GroupQuant(rng.integers(-127, 128, (out, n)).astype(np.int8),
                           rng.uniform(1e-3, 2e-3, (out, 1)), None, INT8, n,
                           activations=activations), "bfloat16")


def _w8a8(rng, out, n):
    return _int8(rng, out, n, INT8_ACTIVATIONS)


def _weights(fmt, rng, layers):
    make, head = {"q4_1": (_q4_1, _q8_0), "int8": (_int8, _int8), "w8a8": (_w8a8, _w8a8)}[fmt]
    placed = lambda w: jax.tree.map(jnp.asarray, w)  # noqa: E731
    return ([[placed(make(rng, *s)) for s in SHAPES] for _ in range(layers)],
            placed(head(rng, VOCAB, HIDDEN)))


def _dense_weights(rng, layers):
    dense = lambda out, n: jnp.asarray(rng.standard_normal((out, n)) * 0.02, jnp.bfloat16)  # noqa: E731
    return [[dense(*s) for s in SHAPES] for _ in range(layers)], dense(VOCAB, HIDDEN)


def _targets(build):
    """(multi target, float target) of a build, loaded under names of their own."""
    stem = f"xla_inference_qmm_bench_{build}"
    targets = {stem + "_multi": cpu_quantized._MULTI_SYMBOL,
               stem + "_float": cpu_quantized._FLOAT_SYMBOL}
    native.load_targets(cpu_quantized._SOURCE, targets, (*native.DEFAULT_FLAGS, *BUILDS[build]))
    return stem + "_multi", stem + "_float"


def _quantized_products(fmt, build):
    multi, single = _targets(build)

    def levels(w):
        return 127.0 if w.activations == INT8_ACTIVATIONS else 16383.0

    def args(w):
        return dict(bits=w.bits, group_size=w.group_size, levels=levels(w),
                    zero_point=w.zero_point)

    def product(x, w):
        y = cpu_quantized.ffi_quantized_matmul_float(single, x, w.values, w.scales, w.offsets,
                                                     **args(w))
        return y[:, :w.out_features]

    def many(x, ws):
        ys = cpu_quantized.ffi_quantized_matmul_multi(
            multi, x, [(w.values, w.scales, w.offsets) for w in ws], **args(ws[0]))
        return [y[:, :w.out_features] for y, w in zip(ys, ws)]
    return product, many


def _dense_products():
    assert cpu_dense.available()
    product = lambda x, w: cpu_dense.dense_matvec(x.astype(jnp.bfloat16), w)  # noqa: E731
    many = lambda x, ws: cpu_dense.dense_matvec_multi(x.astype(jnp.bfloat16), ws)  # noqa: E731
    return product, many


def _nbytes(w):
    return w.nbytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--variants", nargs="+", default=["bf16", "q4_1:default", "int8:default"],
                        help="bf16, or FORMAT:BUILD (formats: q4_1, int8; builds: "
                             + ", ".join(BUILDS) + ")")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weights = {}
    steps = {}
    x = jnp.asarray(rng.standard_normal((1, HIDDEN)), jnp.float32)
    for name in args.variants:
        fmt, _, build = name.partition(":")
        if fmt not in weights:
            weights[fmt] = (_dense_weights(rng, args.layers) if fmt == "bf16"
                            else _weights(fmt, rng, args.layers))
        products = _dense_products() if fmt == "bf16" else _quantized_products(fmt, build)
        steps[name] = (layer_chain_step(*products), weights[fmt])
        layers, head = weights[fmt]
        jax.block_until_ready(steps[name][0](layers, head, x))
    times = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    load = os.getloadavg()[0]
    for _ in range(args.calls):
        for name, (step, (layers, head)) in steps.items():
            c, t = time.process_time(), time.perf_counter()
            jax.block_until_ready(step(layers, head, x))
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    first = args.variants[0]
    base, base_min = statistics.median(times[first]), min(times[first])
    print(f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}; {args.layers} layers; "
          f"medians and fastest of {args.calls}, variants alternated")
    for name, t in times.items():
        layers, head = weights[name.partition(":")[0]]
        total = sum(_nbytes(w) for ws in layers for w in ws) + _nbytes(head)
        m = statistics.median(t)
        print(f"{name:16s} {total / 1e6:6.1f} MB  median {m * 1e3:7.2f} ms ({m / base:.2f} of "
              f"{first}, {total / m / 1e9:5.1f} GB/s)  fastest {min(t) * 1e3:7.2f} ms "
              f"({min(t) / base_min:.2f})  CPU median {statistics.median(cpu[name]) * 1e3:7.2f} ms, "
              f"fastest {min(cpu[name]) * 1e3:7.2f} ms",
              flush=True)


if __name__ == "__main__":
    main()
