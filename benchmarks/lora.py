"""LoRA overhead on the engine (no vLLM): decode steps of a random Llama-shaped model with
4 rank-16 adapters mixed in the batch against the same model without LoRA, in one run.

  PYTHONPATH=. .venv/bin/python benchmarks/lora.py [--hidden 1024 --layers 4 --batch 16]

Prints the median step time of each (batch B: throughput ratio; batch 1: TPOT overhead)."""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def save_model(path: Path, hidden: int, layers: int) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=hidden,
                                   intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                                   num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                                   head_dim=64, max_position_embeddings=1024)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def save_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                      init_lora_weights=False))
    model.save_pretrained(out)
    return out


def time_decode(engine, batch: int, lora_ids: list[int], steps: int) -> float:
    from xla_inference.runner.requests import RequestState

    reqs = []
    for i in range(batch):
        req = RequestState(f"r{i}", [3 + i] * 8, 8, [list(range(1 + 8 * i, 9 + 8 * i))], 0)
        req.lora_id = lora_ids[i % len(lora_ids)]
        reqs.append(req)
    engine.forward([(r, 8) for r in reqs]).logits.block_until_ready()
    for r in reqs:
        r.num_computed_tokens = 7  # decode the last prompt token over and over
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        np.asarray(engine.forward([(r, 1) for r in reqs]).logits)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    import jax.numpy as jnp

    from xla_inference.lora.peft import load_adapter
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    model_dir = save_model(root / "model", args.hidden, args.layers)
    adapters = [save_adapter(model_dir, root / f"a{i}", i) for i in range(4)]
    f32 = jnp.dtype(jnp.float32)
    ecfg = EngineConfig(num_blocks=8 * args.batch + 8, block_size=8, max_num_tokens=8 * args.batch,
                        max_num_seqs=args.batch, max_model_len=64)
    engines = {}
    for mode in ("base", "lora"):
        model = load(model_dir, Precision(f32, f32, f32))
        lora = dict(max_loras=4, max_rank=16, max_cpu_loras=4) if mode == "lora" else None
        engine = build_engine(model, ecfg, lora=lora)
        engine.warm_up()
        ids = [0]
        if lora:
            for i, path in enumerate(adapters, start=1):
                engine.lora.add(i, load_adapter(path, engine.lora.module_shapes, 16))
            ids = [1, 2, 3, 4]
        engines[mode] = (engine, ids)
    # Alternate the two in rounds (a shared machine's load drifts); medians over rounds.
    rounds = {"base": [], "lora": []}
    for _ in range(args.rounds):
        for mode, (engine, ids) in engines.items():
            rounds[mode].append((time_decode(engine, args.batch, ids, args.steps),
                                 time_decode(engine, 1, ids[:1], args.steps)))
    results = {mode: tuple(statistics.median(r[k] for r in rs) for k in range(2))
               for mode, rs in rounds.items()}
    (base_b, base_1), (lora_b, lora_1) = results["base"], results["lora"]
    print(f"hidden {args.hidden}, {args.layers} layers, f32, 4 adapters r16 on q/k/v/o/gate/up/down")
    print(f"batch {args.batch} decode step: base {base_b * 1e3:.2f} ms, LoRA mixed "
          f"{lora_b * 1e3:.2f} ms -> throughput {base_b / lora_b:.2f}x of base")
    print(f"batch 1 decode step (TPOT): base {base_1 * 1e3:.2f} ms, LoRA {lora_1 * 1e3:.2f} ms "
          f"-> +{(lora_1 / base_1 - 1) * 100:.0f}%")


if __name__ == "__main__":
    main()
