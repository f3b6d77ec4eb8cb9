"""The engine's compiled step (no vLLM) on SmolLM2-135M, bfloat16 projections (float32
elsewhere, as on the CPU with dtype=bfloat16) against the embedded GGUF kept quantized
(Q4_1) and online int8: a batch-64 decode step (contexts ~300; decode1: batch 1) and a
2048-token prefill step (ten 200-token prompts and a 48-token chunk, as offline_throughput's 64 x 200 prompts
arrive under max_num_batched_tokens=2048). The three engines' steps take turns; medians,
and each quantized step as a speed ratio to bfloat16 in the same run (>1: faster). A
benchmark, not a test.

    PYTHONPATH=. .venv/bin/python benchmarks/quantized_engine_steps.py --repeats 5
"""

import argparse
import statistics

import jax
import numpy as np
from _engine_steps import BLOCK, CONTEXT, alternated_step_seconds, decode_requests, load_variant

from xla_inference.runner.build import build_engine
from xla_inference.runner.engine import EngineConfig
from xla_inference.runner.requests import RequestState


def _prefill_requests(rng, first_block, lengths):
    reqs, block = [], first_block
    for i, n in enumerate(lengths):
        pages = -(-n // BLOCK)
        reqs.append((RequestState(f"p{i}", rng.integers(0, 49152, size=n).tolist(), n,
                                  [list(range(block, block + pages))], 0), n))
        block += pages
    return reqs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", nargs="+", default=["decode64", "prefill2048"])
    parser.add_argument("--variants", nargs="+", default=["bf16", "gguf", "int8"])
    args = parser.parse_args()
    ecfg = EngineConfig(num_blocks=64 * (CONTEXT // BLOCK + 2) + 256, block_size=BLOCK,
                        max_num_tokens=2048, max_num_seqs=64, max_model_len=1024)
    engines = {name: build_engine(load_variant(name), ecfg) for name in args.variants}
    rng = np.random.default_rng(0)
    steps = {"decode1": decode_requests(1, rng, 1), "decode64": decode_requests(64, rng, 1),
             "prefill2048": _prefill_requests(rng, 1, [200] * 10 + [48])}
    for step in args.steps:
        reqs = steps[step]
        for engine in engines.values():
            jax.block_until_ready(engine.forward(reqs).logits)
        times = alternated_step_seconds(engines, reqs, args.repeats)
        base = statistics.median(times[args.variants[0]])
        print(f"{step:12s} " + " | ".join(
            f"{name} {statistics.median(t) * 1e3:8.1f} ms ({base / statistics.median(t):.2f}x)"
            for name, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
