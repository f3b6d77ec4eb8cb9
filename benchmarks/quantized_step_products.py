"""The projections of one SmolLM2-135M step (30 layers x q, k, v, o, gate, up, down, and the
[49152, 576] LM head) chained in one jit at T rows: XLA's bfloat16 product on dense
bfloat16 weights against the quantized products (quantization/product.quantized_project:
the native kernel, its wide AMX entry or XLA's, as product.py picks for T rows) on int4
groups of 32 with offsets (Q4_1-like) and on per-channel int8, random weights, bfloat16
compute. The variants' calls take turns; medians of wall and CPU time (CPU time also counts
XLA's pool threads while they spin). A benchmark, not a test.

    .venv/bin/python benchmarks/quantized_step_products.py --rows 64 --calls 12
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.quantization.groups import INT4, INT8, GroupQuant
from xla_inference.quantization.packed import pack
from xla_inference.quantization.product import quantized_project

HIDDEN, INTERMEDIATE, KV, VOCAB = 576, 1536, 192, 49152
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
          (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]


def _int4(rng, out, n):
    groups = n // 32
    return pack(GroupQuant(rng.integers(0, 16, (out, n)).astype(np.uint8),
                           rng.uniform(1e-3, 2e-3, (out, groups)),
                           -8e-3 * np.ones((out, groups)), INT4, 32), "bfloat16")


def _int8(rng, out, n):
    return pack(GroupQuant(rng.integers(-127, 128, (out, n)).astype(np.int8),
                           rng.uniform(1e-3, 2e-3, (out, 1)), None, INT8, n), "bfloat16")


def _dense(rng, out, n):
    return jnp.asarray(rng.standard_normal((out, n)) * 0.02, jnp.bfloat16)


def _dense_product(x, w):
    return jnp.einsum("ti,oi->to", x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)


def _quantized_product(x, w):
    return quantized_project(x, w, jnp.float32)


def _step(layers, head, product):
    """A jitted chain of the layers' products shaped like the model's data flow."""
    def step(x):
        for q_w, k_w, v_w, o_w, gate_w, up_w, down_w in layers:
            q, k, v = product(x, q_w), product(x, k_w), product(x, v_w)
            x = x + 0.01 * product(q + jnp.tile(k + v, (1, 3)), o_w)
            x = x + 0.01 * product(jax.nn.silu(product(x, gate_w)) * product(x, up_w), down_w)
        return product(x, head)
    return jax.jit(step)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    steps = {}
    for name, make, head in (("bf16 dense (XLA)", _dense, _dense),
                             ("int4 g32 offsets", _int4, _int8),
                             ("int8 per channel", _int8, _int8)):
        layers = [[make(rng, *shape) for shape in SHAPES] for _ in range(args.layers)]
        product = _dense_product if make is _dense else _quantized_product
        steps[name] = _step(layers, head(rng, VOCAB, HIDDEN), product)
    x = jnp.asarray(rng.standard_normal((args.rows, HIDDEN)), jnp.float32)
    for step in steps.values():
        jax.block_until_ready(step(x))
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for _ in range(args.calls):
        for name, step in steps.items():
            c, t = time.process_time(), time.perf_counter()
            jax.block_until_ready(step(x))
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    base = statistics.median(wall["bf16 dense (XLA)"]), statistics.median(cpu["bf16 dense (XLA)"])
    print(f"T={args.rows}, {args.layers} layers, load average {os.getloadavg()[0]:.1f}")
    for name in steps:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{name:18s} wall {w * 1e3:8.1f} ms ({w / base[0]:.2f}x)   "
              f"CPU {c * 1e3:8.1f} ms ({c / base[1]:.2f}x)")


if __name__ == "__main__":
    main()
