"""Core-only step benchmark: the engine's compiled forward step, without vLLM.

Run: .venv/bin/python benchmarks/core_step.py [--dtype float32] [--repeats 5]
     [--projections bfloat16 --kv-cache bfloat16]  (dtype=bfloat16 on the host CPU:
     bfloat16 projection matrices, float32 activations, a bfloat16 KV cache where the
     native attention kernel runs; layers/linear.py, runner/build.py)
     [--gguf]  (the embedded GGUF file, kept quantized) [--quantization int8|fp8] (online)

Needs only JAX and this package (so it runs on an accelerator machine without vLLM). Loads
SmolLM2-135M (the embedded GGUF) into the engine and times, as medians over `--repeats`
runs after a compile run:
- decode steps at batch 1 and 64 (contexts ~300 tokens), against the memory-bandwidth
  roofline: the bytes a step must read (every weight once, plus each sequence's K/V)
  divided by the bandwidth of a large on-device reduction measured in the same run;
- a 512-token prefill, as FLOP/s against the matmul peak measured on the same device
  (a [2048, 2048] x [2048, 2048] matmul in the step's dtype).
Prints one table; --json writes the figures to a file as well.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # GPUs: allocate as needed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from xla_inference.loading.default_model import default_gguf_path, prepare_default_model  # noqa: E402
from xla_inference.runner.build import Precision, build_engine, load  # noqa: E402
from xla_inference.runner.engine import EngineConfig  # noqa: E402
from xla_inference.runner.requests import RequestState  # noqa: E402

BLOCK = 16


def median_seconds(fn, repeats):
    jax.block_until_ready(fn())  # compile / warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_requests(num, context, rng):
    pages_each = (context + BLOCK) // BLOCK + 1
    reqs = []
    for i in range(num):
        blocks = list(range(1 + i * pages_each, 1 + (i + 1) * pages_each))
        tokens = rng.integers(0, 49152, size=context + 1).tolist()
        reqs.append((RequestState(f"d{i}", tokens, context, [blocks], num_computed_tokens=context), 1))
    return reqs


def measure_bandwidth(repeats, nbytes=1 << 30):
    """Bytes/s of summing a large array already on the device (a read-bound reduction)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a.sum())
    return nbytes / median_seconds(lambda: f(x), repeats)


def measure_matmul_peak(dtype, repeats, n=2048):
    """FLOP/s of a square matmul with `dtype` inputs, accumulating in float32 or wider."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.promote_types(
        dtype, jnp.float32)))
    return 2 * n**3 / median_seconds(lambda: f(a, a), repeats)


def _param_bytes(params):
    return sum(x.nbytes for x in jax.tree.leaves(params))  # packed weights counted packed


def _matmul_flops_per_token(cfg):
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    qkv_o = D * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim * D
    return 2 * L * (qkv_o + 3 * D * F)


def _quantized_paths(params, rows):
    """How the packed weights' products run for `rows` rows: {path: count}."""
    from xla_inference.quantization import product
    from xla_inference.quantization.packed import PackedWeight

    paths = {}
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, PackedWeight)):
        if isinstance(leaf, PackedWeight):
            path = ("wide kernel" if product.uses_wide_kernel(leaf, rows) else
                    "native kernel" if product.uses_kernel(leaf, rows) else "XLA")
            key = f"{leaf.kind}/{leaf.compute_dtype}: {path}"
            paths[key] = paths.get(key, 0) + 1
    return paths


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--projections", default=None,
                        help="dtype of the projection matrices (default: --dtype)")
    parser.add_argument("--kv-cache", default=None,
                        help="dtype of the KV cache (default: --dtype)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--json", default=None)
    parser.add_argument("--model", default=None,
                        help="model directory (default: the embedded SmolLM2)")
    parser.add_argument("--quantization", default=None,
                        help="online int8 / fp8 on an unquantized model (a quantized "
                             "checkpoint or a GGUF file is served quantized anyway)")
    parser.add_argument("--gguf", action="store_true",
                        help="the embedded SmolLM2 GGUF file itself (kept quantized, Q4_1)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights of the model's shapes (only config.json is read)")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    projections = jnp.dtype(args.projections or args.dtype)
    path = args.model or (default_gguf_path() if args.gguf else prepare_default_model())
    kv_dtype = jnp.dtype(args.kv_cache or args.dtype)
    model = load(path, Precision(projections, dtype, kv_dtype), quantization=args.quantization,
                 random_seed=0 if args.random_weights else None)
    cfg = model.cfg
    ecfg = EngineConfig(num_blocks=64 * (args.context // BLOCK + 2) + 64, block_size=BLOCK,
                        max_num_tokens=512, max_num_seqs=64, max_model_len=1024)
    engine = build_engine(model, ecfg)
    rng = np.random.default_rng(0)
    bandwidth = measure_bandwidth(args.repeats)
    peak = measure_matmul_peak(projections, args.repeats)
    weights = _param_bytes(engine.params)
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_dtype.itemsize
    rows = {}
    for batch in (1, 64):
        reqs = decode_requests(batch, args.context, rng)
        t = median_seconds(lambda: engine.forward(reqs).logits, args.repeats)
        need = weights + batch * (args.context + 1) * kv_per_token
        rows[f"decode_b{batch}"] = dict(seconds=t, roofline_seconds=need / bandwidth,
                                        tokens_per_s=batch / t)
    prefill = [(RequestState("p", rng.integers(0, 49152, size=512).tolist(), 512,
                             [list(range(1, 1 + 512 // BLOCK))], 0), 512)]
    t = median_seconds(lambda: engine.forward(prefill).logits, args.repeats)
    flops = 512 * _matmul_flops_per_token(cfg)
    rows["prefill_512"] = dict(seconds=t, flops_per_s=flops / t, matmul_peak_flops_per_s=peak)
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}, dtype {args.dtype}, "
          f"projections {projections.name}, "
          f"weights {weights / 2**20:.0f} MiB, read bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s")
    for rows_in_step in (1, 64, 512):
        paths = _quantized_paths(engine.params, rows_in_step)
        if paths:
            print(f"quantized products at {rows_in_step} rows: {paths}")
    for name, r in rows.items():
        roofline = r.get("roofline_seconds", 0.0)
        extra = (f"roofline {roofline * 1e3:8.2f} ms  ({roofline / r['seconds']:.0%} of it)"
                 if "roofline_seconds" in r else
                 f"{r['flops_per_s'] / 1e9:6.1f} GFLOP/s ({r['flops_per_s'] / peak:.0%} of matmul peak)")
        print(f"{name:12s} {r['seconds'] * 1e3:9.2f} ms   {extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, dtype=args.dtype,
                           projections=projections.name,
                           bandwidth=bandwidth, matmul_peak=peak, **rows), f, indent=1)


if __name__ == "__main__":
    main()
