"""Whole-model step time of SmolLM2-135M against the tensor-parallel size (and the number of
data parallel replicas), on virtual devices.

Run: .venv/bin/python benchmarks/tp_step.py [--sizes 1 2 3 4] [--dp 1 2] [--repeats 5]

Core only (no vLLM): the engine over a mesh of N of 8 virtual CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8, set here before JAX imports). All
virtual devices share the same 2 cores, so this measures what the partitioning and its
collectives cost, not a speed-up: on real accelerators each device brings its own compute.
Prints the median time of a 16-sequence decode step (contexts ~200; with data parallel
replicas, spread evenly over them) and a 128-token prefill (on replica 0).

--paths: how tensor parallel partitions the step, each measured in the same run (TP > 1):
- gspmd: XLA's partitioner alone: the row-parallel projections are product + all-reduce,
  and the native CPU attention (a custom call without a partitioning rule) has the whole
  KV cache and q gathered onto every device, every layer;
- by-hand: the step traced over the mesh (parallel/sharding.traced_over): attention split
  by KV heads in a shard_map, the attention output and MLP down projections as collective
  matmul rings (parallel/collective_matmul.py). Only what divides evenly is split by hand
  (SmolLM2's 9 heads / 3 KV heads: attention at TP 3, the MLP at 2, 3 and 4). The rings
  run where collective_matmul.ring_pays says (not on the CPU); --ring forces them.
The last column is by-hand's decode time over gspmd's.
"""

import argparse
import contextlib
import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from xla_inference.loading.default_model import prepare_default_model  # noqa: E402
from xla_inference.layers import attention, linear  # noqa: E402
from xla_inference.parallel import collective_matmul  # noqa: E402
from xla_inference.parallel.sharding import (build_mesh, tensor_parallel_mesh,  # noqa: E402
                                             traced_over)
from xla_inference.runner import engine as engine_module  # noqa: E402
from xla_inference.runner.build import Precision, build_engine, load  # noqa: E402
from xla_inference.runner.engine import EngineConfig  # noqa: E402
from xla_inference.runner.requests import RequestState  # noqa: E402

from core_step import decode_requests, median_seconds  # noqa: E402  (same directory)

BLOCK = 16


@contextlib.contextmanager
def partitioned(path: str, mesh):
    """Build and run an engine with tensor parallel partitioned as `path` says (module
    docstring). by-hand: the engine's step traced over the mesh, as runner/engine.py does
    with the change proposed in issue 20 (/tmp/team/h6-tp-engine.diff; applied here by
    wrapping its forward functions while the engine is built; the context is set during
    tracing only, so dispatch is untouched). gspmd: the mesh hidden from the layers, so
    the step stays GSPMD's even where the engine traces it over the mesh."""
    if path == "by-hand":
        originals = engine_module._forward_logits, engine_module._forward_replicas
        engine_module._forward_logits, engine_module._forward_replicas = (
            traced_over(mesh, fn) for fn in originals)
        try:
            yield
        finally:
            engine_module._forward_logits, engine_module._forward_replicas = originals
        return
    hidden = lambda: None  # noqa: E731
    linear.tensor_parallel_mesh, attention.tensor_parallel_mesh = hidden, hidden
    try:
        yield
    finally:
        linear.tensor_parallel_mesh = attention.tensor_parallel_mesh = tensor_parallel_mesh


def run(model, tp, dp, path, decode, prefill, repeats):
    """(decode, prefill) median step seconds of an engine over a DP x TP mesh."""
    mesh = build_mesh(tp, dp)
    # 512 pages per replica; request i on replica i % dp (known by its pages).
    ecfg = EngineConfig(num_blocks=512 * dp, block_size=BLOCK, max_num_tokens=128,
                        max_num_seqs=16, max_model_len=1024)
    with partitioned(path, mesh):
        engine = build_engine(model, ecfg, mesh=mesh, keep_host_params=True)
        spread = [(dataclasses.replace(req, block_ids=[[b + i % dp * engine.blocks_per_replica
                                                        for b in req.block_ids[0]]]), n)
                  for i, (req, n) in enumerate(decode)]
        d = median_seconds(lambda: engine.forward(spread).logits, repeats)
        p = median_seconds(lambda: engine.forward(prefill).logits, repeats)
    return d, p


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--dp", type=int, nargs="+", default=[1],
                        help="data parallel replicas (each TP size is run with each)")
    parser.add_argument("--paths", nargs="+", default=["gspmd", "by-hand"],
                        choices=["gspmd", "by-hand"], help="tensor parallel partitionings")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ring", action="store_true",
                        help="by-hand: the collective matmul rings at every step size")
    args = parser.parse_args()
    if args.ring:
        collective_matmul.RING_POLICY = "always"
    model = load(prepare_default_model(), Precision.uniform(jnp.float32))
    rng = np.random.default_rng(0)
    decode = decode_requests(16, 200, rng)
    prefill = [(RequestState("p", rng.integers(0, 49152, size=128).tolist(), 128,
                             [list(range(300, 310))], 0), 128)]
    print(f"{'DP':>3} {'TP':>3} {'path':>8} {'decode b16 (s)':>15} {'prefill 128 (s)':>16} "
          f"{'decode / gspmd':>15}")
    for dp in args.dp:
        for tp in args.sizes:
            if dp * tp > 8:
                continue
            base = None
            for path in args.paths if tp > 1 else args.paths[:1]:
                d, p = run(model, tp, dp, path, decode, prefill, args.repeats)
                base = d if path == "gspmd" else base
                ratio = f"{d / base:.2f}" if base else "-"
                print(f"{dp:>3} {tp:>3} {path:>8} {d:>15.3f} {p:>16.3f} {ratio:>15}",
                      flush=True)


if __name__ == "__main__":
    main()
