"""MLA under tensor parallel on virtual CPU devices: the step of a small random DeepSeek-V3
(64 heads, kv_lora_rank 512, rope 64: the released model's latent, half its heads, a
narrow residual stream) at TP 2,
with the latent attention split by query heads (layers/mla.py, each device its N / tp heads)
against the same engine with that split off (the head-split q gathered and every head run
on every device, as before the split), built in one process and timed in turns: a decode
step of 8 requests over a ~1900-token context, and a 256-token prefill over 1024 cached.
Virtual devices share the host's cores, so this shows the attention work saved per device,
not a multi-chip speed-up; the CPU time of the process (all threads) is printed beside the
wall time, as on a busy host only it shows the work.

    PYTHONPATH=. .venv/bin/python benchmarks/mla_tp_step.py [--repeats 9]
"""

import argparse
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from xla_inference.layers import mla  # noqa: E402
from xla_inference.parallel.sharding import build_mesh  # noqa: E402
from xla_inference.runner.build import Precision, build_engine, load  # noqa: E402
from xla_inference.runner.engine import EngineConfig  # noqa: E402
from xla_inference.runner.requests import RequestState, build_step_batch  # noqa: E402

BLOCK, CONTEXT, NUM_DECODES, PREFILL, PREFILL_CACHED = 16, 1900, 8, 256, 1024


def _checkpoint() -> Path:
    from tests.models.test_deepseek_v3 import save_tiny_deepseek_v3

    path = Path(tempfile.gettempdir()) / "xla_inference_bench_mla_tp64"
    if not (path / "config.json").exists():
        save_tiny_deepseek_v3(path, hidden_size=512, num_attention_heads=64,
                              num_key_value_heads=64, q_lora_rank=128, kv_lora_rank=512,
                              qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
                              num_hidden_layers=2, max_position_embeddings=4096)
    return path


def _engine(split: bool):
    """The TP 2 engine with its steps' programs compiled ahead (as warm-up does) with or
    without the split, and the heads each device's attention call runs in them. JAX's caches
    are cleared first: nested jitted functions keep their traces by function, and the other
    engine's would be reused whatever the switch says."""
    jax.clear_caches()
    f32 = jnp.dtype(jnp.float32)
    model = load(_checkpoint(), Precision(f32, f32, f32))  # build_engine takes the params
    ecfg = EngineConfig(num_blocks=1200, block_size=BLOCK, max_num_tokens=PREFILL,
                        max_num_seqs=NUM_DECODES, max_model_len=2048)
    engine = build_engine(model, ecfg, mesh=build_mesh(2))
    original = mla._split_by_query_heads
    if not split:
        mla._split_by_query_heads = lambda attend, mesh: attend
    heads = set()
    try:
        for step in _steps():
            layout = engine.layout_for(sum(n for _, n in step))
            compiled = engine.lower_step(build_step_batch(step, layout)).compile()
            engine._forward.compiled[layout.num_tokens] = compiled
            heads |= {int(h) for h in re.findall(
                r"= f32\[\d+,(\d+),\d+\]\{[0-9,]+\} custom-call\(", compiled.as_text())}
    finally:
        mla._split_by_query_heads = original
    return engine, heads


def _steps():
    rng = np.random.default_rng(0)
    pages = -(-(CONTEXT + 1) // BLOCK)
    decodes = [(RequestState(f"d{i}", rng.integers(0, 128, CONTEXT + 1).tolist(), CONTEXT,
                             [list(range(1 + i * pages, 1 + (i + 1) * pages))], CONTEXT), 1)
               for i in range(NUM_DECODES)]
    first = 1 + NUM_DECODES * pages
    total = PREFILL_CACHED + PREFILL
    prefill = [(RequestState("p", rng.integers(0, 128, total).tolist(), total,
                             [list(range(first, first + -(-total // BLOCK)))], PREFILL_CACHED),
                PREFILL)]
    return {"decode": decodes, "prefill": prefill}.values()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--attention", action="store_true",
                        help="the latent attention alone at DeepSeek-V3's head layout")
    args = parser.parse_args()
    if args.attention:
        return attention_alone(args.repeats)
    engines = {}
    for name, split in (("gathered (before)", False), ("split by heads", True)):
        engines[name], heads = _engine(split)
        print(f"{name}: each device's attention calls run {sorted(heads)} heads")
    names = ["decode", "prefill"]
    times = {(e, s): [] for e in engines for s in names}
    cpu = {(e, s): [] for e in engines for s in names}
    for _ in range(args.repeats):
        for e, engine in engines.items():
            for s, step in zip(names, _steps()):
                t0, c0 = time.perf_counter(), _cpu_seconds()
                jax.block_until_ready(engine.forward(step).logits)
                times[(e, s)].append(time.perf_counter() - t0)
                cpu[(e, s)].append(_cpu_seconds() - c0)
    for (e, s), t in times.items():
        print(f"{s:8s} {e:18s} wall median {statistics.median(t) * 1e3:8.2f} ms "
              f"(min {min(t) * 1e3:.2f}); CPU time median "
              f"{statistics.median(cpu[(e, s)]) * 1e3:8.2f} ms")


def attention_alone(repeats: int):
    """layers/mla.latent_paged_attention by itself at DeepSeek-V3's layout (128 heads, a
    576-value latent + rope row) on TP 2: 8 decode tokens over 2000-token contexts, split by
    query heads or with q gathered (every head on every device), timed in turns."""
    from jax.sharding import NamedSharding, PartitionSpec

    from xla_inference.kernels.metadata import AttentionMetadata, LayerCache
    from xla_inference.parallel.sharding import traced_over

    heads, width, context, num = 128, 576, 2000, NUM_DECODES
    pages = -(-(context + 1) // BLOCK)
    rng = np.random.default_rng(0)
    tables = np.arange(1, 1 + num * pages, dtype=np.int32).reshape(num, pages)
    positions = np.full(num, context, np.int32)
    slots = tables[:, context // BLOCK] * BLOCK + context % BLOCK
    md = AttentionMetadata(positions, np.arange(num, dtype=np.int32), slots[None].astype(np.int32),
                           tables[None], block_size=BLOCK)
    cache = rng.standard_normal(((1 + num * pages) * BLOCK, 1, width)).astype(np.float32)
    q = rng.standard_normal((num, heads, width)).astype(np.float32)
    key = rng.standard_normal((num, 1, width)).astype(np.float32)
    mesh = build_mesh(2)
    whole = NamedSharding(mesh, PartitionSpec())
    args = (jax.device_put(q, NamedSharding(mesh, PartitionSpec(None, "model", None))),
            *jax.device_put((key, cache, md), whole))

    def attend(q, key, cache, md):
        kv, out = mla.latent_paged_attention(q, key, LayerCache((cache,), np.int32(0)), md,
                                             scale=width ** -0.5)
        return kv.arrays[0], out

    original = mla._split_by_query_heads
    programs = {}
    for name, split in (("gathered (before)", False), ("split by heads", True)):
        mla._split_by_query_heads = original if split else (lambda attend, mesh: attend)
        programs[name] = jax.jit(traced_over(mesh, attend)).lower(*args).compile()
    mla._split_by_query_heads = original
    wall = {name: [] for name in programs}
    cpu = {name: [] for name in programs}
    for _ in range(repeats):
        for name, program in programs.items():
            t0, c0 = time.perf_counter(), _cpu_seconds()
            jax.block_until_ready(program(*args))
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(_cpu_seconds() - c0)
    for name in programs:
        print(f"attention {name:18s} wall median {statistics.median(wall[name]) * 1e3:8.2f} ms "
              f"(min {min(wall[name]) * 1e3:.2f}); CPU time median "
              f"{statistics.median(cpu[name]) * 1e3:8.2f} ms")


def _cpu_seconds() -> float:
    """CPU time of every thread of this process (user + system): the work a step does,
    which a busy host's wall clock hides."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
