"""KV offload stores, synchronous against dispatched (kv_transfer/offload.py), on this
machine's JAX device, no vLLM: a cache shaped like SmolLM2-135M's (30 layers, K and V,
3 KV heads x 64, float32, pages of 16 tokens) and a stand-in forward (a jitted step that
donates the cache, writes a page and does `--matmuls` products). Each step stores
`--pages` pages to a host tier the way the worker does, then runs the forward:

- sync: HostPageStore.store (gather, wait, host copy), then the forward;
- async: store_async, the forward dispatched, then finish() after it.

Alternated `--repeats` times; medians of the step's wall time and of the time the step
thread spends before the forward is dispatched.

    .venv/bin/python benchmarks/kv_offload_store_overlap.py
"""

import argparse
import json
import os
import statistics
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.kernels.metadata import KvCache
from xla_inference.kv_transfer.host_tier import HostPageStore
from xla_inference.runner.kv_pages import EnginePages

BLOCK, LAYERS, HEADS, HEAD = 16, 30, 3, 64


def _forward(matmuls: int):
    def step(arrays, x):
        for _ in range(matmuls):
            x = jnp.tanh(x @ x) * 0.5
        row = jnp.broadcast_to(x[:BLOCK, :HEAD][:, None, :], (BLOCK, HEADS, HEAD))
        arrays = jax.tree.map(lambda a: a.at[:BLOCK].set(row.astype(a.dtype)), arrays)
        return arrays, x
    return jax.jit(step, donate_argnums=(0,))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-pages", type=int, default=256)
    parser.add_argument("--pages", type=int, default=30, help="pages stored per step")
    parser.add_argument("--matmuls", type=int, default=8)
    parser.add_argument("--size", type=int, default=384, help="the forward's matrix size")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    rows = args.num_pages * BLOCK
    cache = KvCache([tuple(jax.device_put(rng.standard_normal((rows, HEADS, HEAD))
                                          .astype(np.float32)) for _ in range(2))
                     for _ in range(LAYERS)], (0, 1), (0, 0))
    engine = SimpleNamespace(replicas=1, kv_cache=cache,
                             cfg=SimpleNamespace(block_size=BLOCK, max_model_len=2048))
    pages = EnginePages(engine)
    pages.warm_up()
    store = HostPageStore(pages.layout, BLOCK, num_chunks=args.pages, blocks_per_chunk=1)
    forward = _forward(args.matmuls)
    x = jnp.asarray(rng.standard_normal((args.size, args.size)).astype(np.float32) * 0.05)

    def run(mode: str):
        device = rng.choice(args.num_pages, args.pages, replace=False).tolist()
        host = list(range(args.pages))
        start = time.perf_counter()
        if mode == "sync":
            store.store(pages, device, host)
            pending = None
        else:
            pending = store.store_async(pages, device, host)
        dispatched = time.perf_counter()
        arrays, y = forward(engine.kv_cache.arrays, x)
        engine.kv_cache = KvCache(list(arrays), (0, 1), (0, 0))
        if pending is not None:
            pending.finish()
        jax.block_until_ready((arrays, y))
        return time.perf_counter() - start, dispatched - start

    for mode in ("sync", "async"):  # compile, first runs
        run(mode)
    times = {"sync": [], "async": []}
    for r in range(args.repeats):
        for mode in ("sync", "async") if r % 2 == 0 else ("async", "sync"):
            times[mode].append(run(mode))
    result = {f"{mode}_{what}_ms": 1e3 * statistics.median(t[i] for t in times[mode])
              for mode in times for i, what in enumerate(("step", "before_forward"))}
    result.update(pages_per_step=args.pages, page_bytes=store.page_bytes,
                  device=str(jax.devices()[0]), load_average=os.getloadavg()[0])
    result["step_ratio_async_over_sync"] = result["async_step_ms"] / result["sync_step_ms"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
