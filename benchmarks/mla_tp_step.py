"""MLA under tensor parallel on virtual CPU devices: the step of a small random DeepSeek-V3
(16 heads, kv_lora_rank 256, rope 32: the released model's head layout, narrower) at TP 2,
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
from xla_inference.runner.requests import RequestState  # noqa: E402

BLOCK, CONTEXT, NUM_DECODES, PREFILL, PREFILL_CACHED = 16, 1900, 8, 256, 1024


def _checkpoint() -> Path:
    from tests.models.test_deepseek_v3 import save_tiny_deepseek_v3

    path = Path(tempfile.gettempdir()) / "xla_inference_bench_mla_tp"
    if not (path / "config.json").exists():
        save_tiny_deepseek_v3(path, hidden_size=512, num_attention_heads=16,
                              num_key_value_heads=16, q_lora_rank=128, kv_lora_rank=256,
                              qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
                              num_hidden_layers=2, max_position_embeddings=4096)
    return path


def _engine(split: bool):
    """The TP 2 engine, its step traced (by a first step) with or without the split."""
    f32 = jnp.dtype(jnp.float32)
    model = load(_checkpoint(), Precision(f32, f32, f32))  # build_engine takes the params
    ecfg = EngineConfig(num_blocks=1200, block_size=BLOCK, max_num_tokens=PREFILL,
                        max_num_seqs=NUM_DECODES, max_model_len=2048)
    engine = build_engine(model, ecfg, mesh=build_mesh(2))
    original = mla._split_by_query_heads
    if not split:
        mla._split_by_query_heads = lambda attend, mesh: attend
    try:
        for step in _steps():
            jax.block_until_ready(engine.forward(step).logits)
    finally:
        mla._split_by_query_heads = original
    return engine


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
    args = parser.parse_args()
    engines = {"gathered (before)": _engine(split=False), "split by heads": _engine(split=True)}
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


def _cpu_seconds() -> float:
    """CPU time of every thread of this process (user + system): the work a step does,
    which a busy host's wall clock hides."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
