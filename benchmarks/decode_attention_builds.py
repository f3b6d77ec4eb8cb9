"""The native CPU attention kernel's decode path, build against build: one decode token of
SmolLM2-135M (9 query heads, 3 KV heads, head dim 64) through 30 layers, each layer with its
own bfloat16 (or --kv-cache float32 / float8_e4m3fn) cache on shuffled pages, at each
--contexts. Builds: "grouped", the default (attend_one_grouped: range_partials_grouped_avx512 on an AVX-512
CPU, _avx2 on AVX2: each KV head's rows widened once for its query heads), and
"per-head", -DXLA_INFERENCE_ATTENTION_GROUPED=0 (attend_one_avx512 / attend_one_avx2: one
query head at a time); "nospare", the grouped path on the calling thread alone; "16dims",
-DXLA_INFERENCE_ATTENTION_VALUE_CHUNKS=2 (AVX2: the weighted values 16 dims a pass over the
keys, as before 2026-12-04, against 32 now). A jitted step of 30 chained calls (each
layer's output is the next one's q) per build, the builds taking turns; medians of the
step's wall-clock time and of the process's CPU time (all threads), each divided by 30 for
one call (the step's dispatch included: "dispatch" is the same jitted step without the
kernel). A benchmark, not a test.

--against REV adds the kernel's sources at git revision REV as builds "REV" and
"REV-nospare" (their bits may differ from this one's: the largest difference is printed);
--in-a-row N runs each build's step N times in a row and times all but the first (the
spare core's helper awake, as in a server's decode, where a step's kernels keep it
spinning; 1: one step after a 3 ms pause, the helper asleep).

    PYTHONPATH=. .venv/bin/python benchmarks/decode_attention_builds.py --contexts 300 540
    PYTHONPATH=. .venv/bin/python benchmarks/decode_attention_builds.py --contexts 540 2048
    PYTHONPATH=. .venv/bin/python benchmarks/decode_attention_builds.py --contexts 540 1024 \
        2048 --against HEAD~1 --in-a-row 5 --repeats 60

--calls N chains N calls, each on a cache of its own: with 300 the caches (155 MB at 540
keys) no longer fit the last-level cache, so every call reads its keys and values from
memory, as in a served decode step (whose weights evict them):

    PYTHONPATH=. .venv/bin/python benchmarks/decode_attention_builds.py --contexts 540 \
        --calls 300 --against HEAD --repeats 20
"""

import argparse
import os
import subprocess
import tempfile
from pathlib import Path
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from xla_inference.kernels import cpu_attention, native  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30  # SmolLM2-135M
BLOCK = 16
BUILDS = {"per-head": ("-DXLA_INFERENCE_ATTENTION_GROUPED=0", "-DXLA_INFERENCE_SPARE_CORE=0"),
          "nospare": ("-DXLA_INFERENCE_SPARE_CORE=0",),  # grouped, on the calling thread alone
          # AVX2: the weighted values 16 dims a pass over the keys (before 2026-12-04), not 32
          "16dims": ("-DXLA_INFERENCE_ATTENTION_VALUE_CHUNKS=2",),
          # a lone token shared with the spare core: by KV head on AVX-512, by key range
          # and KV head on AVX2
          "grouped": ()}


def step_fn(target):
    def step(q, ks, vs, seq_ids, positions, tables):
        for k, v in zip(ks, vs):
            if target is None:  # the dispatch alone
                q = q * 1.0001
                continue
            q = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
                q, k, v, seq_ids, positions, tables, block_size=np.int64(BLOCK),
                scale=np.float32(HEAD_DIM ** -0.5), sliding_window=np.int64(0),
                soft_cap=np.float32(0.0), attention_chunk=np.int64(0))
        return q
    return jax.jit(step)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", type=int, nargs="+", default=[300, 540])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--kv-cache", default="bfloat16")
    parser.add_argument("--calls", type=int, default=LAYERS,
                        help="chained calls a step (30: SmolLM2's layers)")
    parser.add_argument("--layers", type=int, default=None,
                        help="caches, the calls taking them in turn (default: one a call; "
                             "1: one layer's, in L2; 300 calls on 300 caches, 155 MB at 540 "
                             "keys: every call's cache from memory, as in a served step, "
                             "whose weights evict the caches from L3)")
    parser.add_argument("--against", metavar="REV", default=None,
                        help="also the kernel's sources at this git revision")
    parser.add_argument("--in-a-row", type=int, default=1, metavar="N",
                        help="steps of a build in a row, all but the first timed")
    args = parser.parse_args()
    args.layers = args.layers or args.calls
    if args.calls < 1 or args.layers < 1 or args.calls % args.layers:
        parser.error("--calls and --layers: positive, the calls a multiple of the caches")
    targets = {}
    for name, flags in BUILDS.items():
        targets[name] = f"xla_inference_paged_attention_bench_{name.replace('-', '_')}"
        native.load_targets(cpu_attention._SOURCE, {targets[name]: "XlaInferencePagedAttention"},
                            (*native.DEFAULT_FLAGS, *flags))
    if args.against:
        sources = _sources_at(args.against)
        for name, flags in {args.against: (), f"{args.against}-nospare": BUILDS["nospare"]}.items():
            targets[name] = "xla_inference_paged_attention_bench_rev_" + "".join(
                c if c.isalnum() else "_" for c in name)
            native.load_targets(sources, {targets[name]: "XlaInferencePagedAttention"},
                                (*native.DEFAULT_FLAGS, *flags))
    targets["dispatch"] = None
    rng = np.random.default_rng(0)
    pages_per_layer = -(-(max(args.contexts) + 1) // BLOCK) + 8
    shape = (pages_per_layer * BLOCK, NUM_KV_HEADS, HEAD_DIM)
    dtype = jnp.dtype(args.kv_cache)
    ks = [jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
          for _ in range(args.layers)]
    vs = [jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
          for _ in range(args.layers)]
    ks, vs = ks * (args.calls // args.layers), vs * (args.calls // args.layers)
    fns = {name: step_fn(target) for name, target in targets.items()}
    print(f"uptime: {os.getloadavg()}  kv cache {args.kv_cache}  {args.calls} calls, "
          f"{args.layers} caches  "
          f"median of {args.repeats}", flush=True)
    for context in args.contexts:
        tables = rng.permutation(np.arange(pages_per_layer))[None, :].astype(np.int32)
        inputs = (jnp.asarray(rng.standard_normal((1, NUM_HEADS, HEAD_DIM), np.float32)), ks, vs,
                  jnp.asarray([0], jnp.int32), jnp.asarray([context], jnp.int32),
                  jnp.asarray(tables))
        outs = {name: np.asarray(fn(*inputs)) for name, fn in fns.items()}  # compile
        for name in ("per-head", "16dims", "nospare"):
            assert np.array_equal(outs["grouped"], outs[name]), f"{name}'s bits differ"
        if args.against:
            diff = np.abs(outs["grouped"] - outs[args.against]).max()
            print(f"context {context}: largest difference from {args.against}: "
                  f"{diff / np.abs(outs[args.against]).max():.2e} of its largest output")
        wall = {name: [] for name in fns}
        cpu = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                # Each build has a helper of its own, spinning for 2 ms after its last job
                # (spare_core.h): let the last build's go to sleep first, or the two halve
                # each other's core.
                time.sleep(0.003)
                for step in range(args.in_a_row):
                    w0, c0 = time.perf_counter(), time.process_time()
                    fn(*inputs).block_until_ready()
                    if step > 0 or args.in_a_row == 1:
                        wall[name].append(time.perf_counter() - w0)
                        cpu[name].append(time.process_time() - c0)
        for name in fns:
            w, c = statistics.median(wall[name]), statistics.median(cpu[name])
            print(f"context {context:5d} {name:9s} step {w * 1e6:8.1f} us wall "
                  f"({w / args.calls * 1e6:6.2f} us per call), CPU {c * 1e6:8.1f} us "
                  f"({c / args.calls * 1e6:6.2f} us per call)", flush=True)
    print(f"uptime: {os.getloadavg()}", flush=True)


def _sources_at(rev: str) -> tuple[Path, Path]:
    """The spare core's and the attention kernel's sources (with the headers beside them)
    as they were at git revision `rev`, in a directory of their own."""
    here = Path(cpu_attention._SOURCE[1]).parent
    root = Path(subprocess.check_output(["git", "rev-parse", "--show-toplevel"], cwd=here,
                                        text=True).strip())
    out = Path(tempfile.mkdtemp(prefix="attention-sources-"))
    for path in [*here.glob("*.h"), *cpu_attention._SOURCE]:
        rel = Path(path).resolve().relative_to(root)
        (out / rel.name).write_bytes(subprocess.check_output(
            ["git", "show", f"{rev}:{rel.as_posix()}"], cwd=root))
    return out / Path(cpu_attention._SOURCE[0]).name, out / Path(cpu_attention._SOURCE[1]).name


if __name__ == "__main__":
    main()
