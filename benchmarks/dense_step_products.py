"""The one-row bfloat16 products of a SmolLM2-135M decode step (30 layers x q, k, v, o, gate,
up, down, then the [49152, 576] LM head: 269 MB of weights) chained in one jit, XLA's
product against builds of the native kernel (kernels/cpu/dense_matvec.cc) with other
compile-time settings: software prefetch (the next block into L2, or rows ahead), and the weight bytes per
woken pool thread. Every variant multiplies the SAME weight arrays (so each finds them in
the caches as the previous one left them, as a one-engine server does); the variants' calls
take turns; medians. Also the LM head alone. Effective bandwidth = weight bytes / time
(the machine's floor: ~45 GB/s). A benchmark, not a test.

    PYTHONPATH=. .venv/bin/python benchmarks/dense_step_products.py --calls 20
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.kernels import cpu_dense, native

HIDDEN, INTERMEDIATE, KV, VOCAB = 576, 1536, 192, 49152
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
          (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]

# name -> extra compile flags of the native kernel (None: XLA's product)
_ROWS_AHEAD = ("-DXLA_INFERENCE_DENSE_PREFETCH_BLOCKS=0",
               "-DXLA_INFERENCE_DENSE_PREFETCH_HINT=_MM_HINT_T0")  # the earlier scheme, into L1

# name -> extra compile flags of the native kernel (None: XLA's product)
VARIANTS = {
    "xla": None,
    "native": (),  # the default build (the next block of 8 rows prefetched into L2)
    "old": (*_ROWS_AHEAD,),  # 16 rows ahead into L1, the default until issue 18's q18
    "next-t0": ("-DXLA_INFERENCE_DENSE_PREFETCH_HINT=_MM_HINT_T0",),  # the next block, L1
    "next2": ("-DXLA_INFERENCE_DENSE_PREFETCH_BLOCKS=2",),  # 2 blocks ahead, L2
    "pf0": (*_ROWS_AHEAD, "-DXLA_INFERENCE_DENSE_PREFETCH_ROWS=0"),
    "pf8": (*_ROWS_AHEAD, "-DXLA_INFERENCE_DENSE_PREFETCH_ROWS=8"),
    "pf16": (*_ROWS_AHEAD, "-DXLA_INFERENCE_DENSE_PREFETCH_ROWS=16"),
    "pf32": (*_ROWS_AHEAD, "-DXLA_INFERENCE_DENSE_PREFETCH_ROWS=32"),
    "pf16-t2": ("-DXLA_INFERENCE_DENSE_PREFETCH_BLOCKS=0", "-DXLA_INFERENCE_DENSE_PREFETCH_ROWS=16",
                "-DXLA_INFERENCE_DENSE_PREFETCH_HINT=_MM_HINT_T2"),
    "nospare": ("-DXLA_INFERENCE_SPARE_CORE=0",),  # no spare core (kernels/cpu/spare_core.h)
    "nospare-multi": ("-DXLA_INFERENCE_SPARE_CORE=0",),
    "1thread": ("-DXLA_INFERENCE_DENSE_BYTES_PER_THREAD=(1ll<<40)", "-DXLA_INFERENCE_SPARE_CORE=0"),
    "256k": ("-DXLA_INFERENCE_DENSE_BYTES_PER_THREAD=(1<<18)", "-DXLA_INFERENCE_SPARE_CORE=0"),
    "1m-multi": ("-DXLA_INFERENCE_DENSE_BYTES_PER_THREAD=(1<<20)",),
    "pf16-256k": (*_ROWS_AHEAD, "-DXLA_INFERENCE_DENSE_PREFETCH_ROWS=16",
                  "-DXLA_INFERENCE_DENSE_BYTES_PER_THREAD=(1<<18)"),
    # q/k/v and gate/up each one call (cpu_dense.dense_matvec_multi)
    "multi": (),
    "old-multi": (*_ROWS_AHEAD,),
    "256k-multi": ("-DXLA_INFERENCE_DENSE_BYTES_PER_THREAD=(1<<18)",),
}


def _products(name, flags):
    """(product(x, w), many(x, ws)) of the variant."""
    if flags is None:
        product = lambda x, w: jnp.einsum("ti,io->to", x.astype(jnp.bfloat16), w.T,  # noqa: E731
                                          preferred_element_type=jnp.float32)
        return product, lambda x, ws: [product(x, w) for w in ws]
    target, multi = cpu_dense._TARGET, cpu_dense._MULTI_TARGET
    if flags:
        stem = f"xla_inference_dense_matvec_bench_{name.replace('-', '_')}"
        target, multi = stem + "_one", stem + "_many"
        native.load_targets(cpu_dense._SOURCE,
                            {target: cpu_dense._SYMBOL, multi: cpu_dense._MULTI_SYMBOL},
                            (*native.DEFAULT_FLAGS, *flags))
    else:
        assert cpu_dense.available()
    product = lambda x, w: cpu_dense.ffi_dense_matvec(target, x, w)  # noqa: E731
    if name.endswith("multi"):
        return product, lambda x, ws: cpu_dense.ffi_dense_matvec_multi(multi, x, ws)
    return product, lambda x, ws: [product(x, w) for w in ws]


def layer_chain_step(product, many):
    """A decoder step's one-row products chained as the model chains them (q/k/v, o,
    gate/up, down per layer, then the LM head), jitted: `product(x, w)` and `many(x, ws)`."""
    def step(layers, head, x):
        for q_w, k_w, v_w, o_w, gate_w, up_w, down_w in layers:
            q, k, v = many(x, [q_w, k_w, v_w])
            x = x + 0.01 * product(q + jnp.tile(k + v, (1, 3)), o_w)
            gate, up = many(x, [gate_w, up_w])
            x = x + 0.01 * product(jax.nn.silu(gate) * up, down_w)
        return product(x, head)
    return jax.jit(step)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    dense = lambda out, n: jnp.asarray(rng.standard_normal((out, n)) * 0.02, jnp.bfloat16)  # noqa: E731
    layers = [[dense(*shape) for shape in SHAPES] for _ in range(args.layers)]
    head = dense(VOCAB, HIDDEN)
    layer_bytes = sum(w.nbytes for ws in layers for w in ws)
    x = jnp.asarray(rng.standard_normal((1, HIDDEN)), jnp.float32)
    steps, heads = {}, {}
    for name in args.variants:
        product, many = _products(name, VARIANTS[name])
        steps[name] = layer_chain_step(product, many)
        heads[name] = jax.jit(product)
        jax.block_until_ready(steps[name](layers, head, x))
        jax.block_until_ready(heads[name](x, head))
    times = {name: ([], []) for name in steps}
    cpu = {name: [] for name in steps}  # process CPU time of each step
    for _ in range(args.calls):
        for name in steps:
            c, t = time.process_time(), time.perf_counter()
            jax.block_until_ready(steps[name](layers, head, x))
            times[name][0].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
            t = time.perf_counter()
            jax.block_until_ready(heads[name](x, head))
            times[name][1].append(time.perf_counter() - t)
    total = layer_bytes + head.nbytes
    base = statistics.median(times[args.variants[0]][0])
    print(f"load average {os.getloadavg()[0]:.1f}; {args.layers} layers, {total / 1e6:.0f} MB "
          f"(head {head.nbytes / 1e6:.1f} MB); medians of {args.calls}")
    for name, (step_t, head_t) in times.items():
        s, h = statistics.median(step_t), statistics.median(head_t)
        print(f"{name:10s} step {s * 1e3:7.2f} ms ({base / s:.2f}x, {total / s / 1e9:5.1f} GB/s)  "
              f"head alone {h * 1e3:6.2f} ms ({head.nbytes / h / 1e9:5.1f} GB/s)  "
              f"step CPU {statistics.median(cpu[name]) * 1e3:7.2f} ms", flush=True)


if __name__ == "__main__":
    main()
