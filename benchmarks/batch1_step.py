"""A batch-1 decode step of the engine (no vLLM) on SmolLM2-135M (context ~300), as
served on the host CPU with dtype=bfloat16 (bfloat16 projections, float32 elsewhere):
XLA's one-row bfloat16 product ("bf16-xla", XLA_INFERENCE_CPU_DENSE=0) against the native
one (kernels/cpu_dense.py, "bf16"), the embedded GGUF kept quantized (Q4_1, "gguf"),
online int8 ("int8") and an AWQ 4-bit checkpoint ("awq": group size 64, zero points,
round-to-nearest; written once under the cache by _server.prepare_awq_model). The engines'
steps take turns; medians, each as a speed ratio to the first variant (> 1: faster); and
the host's part of each step (the time until engine.forward returns: the step's batch,
and the jit call with each of the model's parameter arrays), with the number of arrays.
A benchmark, not a test.

Engines alternated in one process evict each other's weights from the last-level cache,
which a server with one engine keeps partly there: for a figure that matches serving, run
one variant per process, the processes alternated (the lines below, twice).

"bf16kv": "bf16" with the bfloat16 KV cache the native attention kernel reads (dtype=bfloat16
on the CPU); against "bf16" (a float32 cache) at a longer context or a wider batch:

    PYTHONPATH=. .venv/bin/python benchmarks/batch1_step.py --variants bf16 bf16kv --context 550
    PYTHONPATH=. .venv/bin/python benchmarks/batch1_step.py --variants bf16 bf16kv --batch 64

"VARIANT-arrays" passes the quantized weights' arrays to the step program
(XLA_INFERENCE_WEIGHT_TABLE=0) rather than naming them by address; --pipelined N also times
runs of N steps, each dispatched while the one before runs, as a server overlaps them (the
host's part then competes with the spare core's helper for the second core):

    PYTHONPATH=. .venv/bin/python benchmarks/batch1_step.py --variants bf16 gguf gguf-arrays \
        --kv-cache bfloat16 --context 540 --repeats 30 --pipelined 16

"VARIANT@BUILD": the variant with another build of its one-row kernel, BUILD one of
benchmarks/dense_step_products.py's VARIANTS (bfloat16) or quantized_one_row_builds.py's
BUILDS (gguf, int8): their compile flags. E.g. the earlier prefetching against the default,
for each kernel in one run:

    PYTHONPATH=. .venv/bin/python benchmarks/batch1_step.py --variants bf16@old bf16
    PYTHONPATH=. .venv/bin/python benchmarks/batch1_step.py --variants gguf@old gguf

    PYTHONPATH=. .venv/bin/python benchmarks/batch1_step.py --repeats 30

"--kv-cache bfloat16" gives every variant the bfloat16 KV cache that serving with
dtype=bfloat16 gives the CPU (the float32 default is the earlier sessions' figures'):

    PYTHONPATH=. .venv/bin/python benchmarks/batch1_step.py --variants bf16 gguf awq int8 \
        --kv-cache bfloat16 --context 540 --repeats 20
    PYTHONPATH=. .venv/bin/python benchmarks/batch1_step.py --repeats 40 --variants bf16-xla
    PYTHONPATH=. .venv/bin/python benchmarks/batch1_step.py --repeats 40 --variants bf16
"""

import argparse
import contextlib
import os
import statistics

import jax
import numpy as np
from _engine_steps import (BLOCK, CONTEXT, alternated_step_seconds, decode_requests, load_variant,
                           pipelined_step_seconds)
from dense_step_products import VARIANTS as DENSE_BUILDS
from quantized_one_row_builds import BUILDS as QUANTIZED_BUILDS

from xla_inference.kernels import cpu_dense, cpu_quantized, native
from xla_inference.runner.build import build_engine
from xla_inference.runner.engine import EngineConfig


@contextlib.contextmanager
def _kernel_build(variant, build):
    """While an engine is traced, the one-row kernel's build `build` ("": the default) in
    place of the default one: dense_step_products' VARIANTS for the bfloat16 kernel ("bf16"),
    quantized_one_row_builds' BUILDS for the quantized one (other variants)."""
    if not build:
        yield
        return
    kernel = "dense" if variant.startswith("bf16") else "quantized"
    stem = f"xla_inference_b1_{kernel}_{build.replace('-', '_')}"
    if kernel == "dense":
        module, names = cpu_dense, {"_TARGET": cpu_dense._SYMBOL,
                                    "_MULTI_TARGET": cpu_dense._MULTI_SYMBOL}
        flags = DENSE_BUILDS[build]
    else:
        # (the table entry too: a decode step names its weights by address)
        module, names = cpu_quantized, {"_FLOAT_TARGET": cpu_quantized._FLOAT_SYMBOL,
                                        "_MULTI_TARGET": cpu_quantized._MULTI_SYMBOL,
                                        "_TABLE_TARGET": cpu_quantized._TABLE_SYMBOL}
        flags = QUANTIZED_BUILDS[build]
    assert module.available()  # the default build registered under the default names first
    targets = {f"{stem}{attr.lower()}": attr for attr in names}
    native.load_targets(module._SOURCE, {t: names[a] for t, a in targets.items()},
                        (*native.DEFAULT_FLAGS, *flags))
    saved = {attr: getattr(module, attr) for attr in names}
    for target, attr in targets.items():
        setattr(module, attr, target)
    try:
        yield
    finally:
        for attr, target in saved.items():
            setattr(module, attr, target)


def _engine(name, ecfg, reqs, kv_cache=None):
    """The variant's engine, its step compiled with the native matvec on or off (and the
    kernel build named after "@")."""
    variant, _, build = name.partition("@")
    os.environ["XLA_INFERENCE_CPU_DENSE"] = "0" if variant == "bf16-xla" else "1"
    # "-arrays": the quantized weights passed as arrays, not named by address
    os.environ["XLA_INFERENCE_WEIGHT_TABLE"] = "0" if variant.endswith("-arrays") else "1"
    variant = variant.removesuffix("-arrays")
    cpu_dense.available.cache_clear()
    with _kernel_build(variant, build):
        engine = build_engine(load_variant("bf16" if variant == "bf16-xla" else variant, kv_cache),
                              ecfg)
        jax.block_until_ready(engine.forward(reqs).logits)  # traced and compiled under the setting
    return engine


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--variants", nargs="+", default=["bf16-xla", "bf16", "gguf", "int8"])
    parser.add_argument("--batch", type=int, default=1, help="decode requests in the step")
    parser.add_argument("--context", type=int, default=CONTEXT, help="tokens each has before")
    parser.add_argument("--kv-cache", choices=["float32", "bfloat16"], default="float32",
                        help="every variant's KV cache (bfloat16: as served with "
                             "dtype=bfloat16 on the CPU)")
    parser.add_argument("--pipelined", type=int, default=0, metavar="N",
                        help="also time runs of N steps, each dispatched while the one "
                             "before runs (a server's overlap; its host part then takes "
                             "CPU from the step's spare core)")
    args = parser.parse_args()
    pages = args.batch * ((args.context + BLOCK) // BLOCK + 1) + 1
    ecfg = EngineConfig(num_blocks=max(64, pages), block_size=BLOCK, max_num_tokens=512,
                        max_num_seqs=max(8, args.batch), max_model_len=1024)
    reqs = decode_requests(args.batch, np.random.default_rng(0), 1, args.context)
    engines = {name: _engine(name, ecfg, reqs, args.kv_cache) for name in args.variants}
    cpu, dispatch = {}, {}
    times = alternated_step_seconds(engines, reqs, args.repeats, cpu, dispatch)
    base = statistics.median(times[args.variants[0]])
    fastest = min(times[args.variants[0]])
    print(f"load average {os.getloadavg()[0]:.1f}; batch-{args.batch} decode step at "
          f"context {args.context}, median and fastest of "
          f"{args.repeats} (the fastest: the pass least disturbed on a shared machine)")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"{name:9s} median {m * 1e3:8.2f} ms ({base / m:.2f}x)   fastest {min(t) * 1e3:8.2f} ms "
              f"({fastest / min(t):.2f}x)   CPU median {statistics.median(cpu[name]) * 1e3:7.2f} ms"
              f"   dispatch median {statistics.median(dispatch[name]) * 1e3:5.2f} ms "
              f"({_step_arrays(engines[name], args.batch)} parameter arrays)", flush=True)
    if args.pipelined:
        times = pipelined_step_seconds(engines, reqs, args.repeats, args.pipelined)
        base = statistics.median(times[args.variants[0]])
        print(f"runs of {args.pipelined} steps, each dispatched while the one before runs; "
              f"medians of {args.repeats} runs")
        for name, t in times.items():
            m = statistics.median(t)
            print(f"{name:9s} pipelined median {m * 1e3:8.2f} ms a step ({base / m:.2f}x)   "
                  f"fastest {min(t) * 1e3:8.2f} ms", flush=True)


def _step_arrays(engine, batch: int) -> int:
    """The parameter arrays a step of `batch` tokens passes (the weight table's program
    passes one table for the quantized weights it names by address)."""
    if engine._by_address(batch):
        return len(engine._table_params[0]) + 1
    return len(jax.tree.leaves(engine.params))


if __name__ == "__main__":
    main()
