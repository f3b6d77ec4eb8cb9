"""LoRA overhead, 4 rank-16 adapters on q/k/v/o/gate/up/down mixed in one batch against the
base model alone, two ways:

- engine (default, no vLLM): prefill and decode steps of a random Llama-shaped model (or
  SmolLM2-135M with --smollm2), base and LoRA engines alternated in rounds; median step
  times.

    PYTHONPATH=. .venv/bin/python benchmarks/lora.py [--hidden 1024 --layers 4 --batch 16]
    PYTHONPATH=. .venv/bin/python benchmarks/lora.py --smollm2 --dtype bfloat16 --batch 32
    PYTHONPATH=. .venv/bin/python benchmarks/lora.py --quantization int8  # over an int8 base
    PYTHONPATH=. .venv/bin/python benchmarks/lora.py --moe --hidden 512  # Qwen3-MoE-shaped,
        # attention-only adapters (the experts' LoRA products are skipped: lora/slots.py)

- --vllm: the issue's benchmark, offline throughput through vllm.LLM on SmolLM2-135M
  (prepare_default_model) with random PEFT adapters saved by `peft`. One child process
  serves the base model without --enable-lora, another with --enable-lora (max_loras 4);
  the LoRA child alternates passes of base-only requests and of requests mixing the four
  adapters (each request one adapter, round-robin). New random prompts each pass (no
  prefix-cache hits); greedy, ignore_eos; medians over --rounds. Also batch-1 TPOT (one
  request, time / tokens) for each.

    .venv/bin/python benchmarks/lora.py --vllm --dtype bfloat16 [--order plain,lora,plain]

Prints each throughput ratio and the batch-1 TPOT overhead."""

import argparse
import json
import os
import statistics
import subprocess
import sys
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


def save_moe_model(path: Path, hidden: int, layers: int) -> Path:
    """A Qwen3-MoE-shaped model: 32 experts, 4 per token, every layer MoE."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 2,
                                      moe_intermediate_size=hidden // 2, num_experts=32,
                                      num_experts_per_tok=4, num_hidden_layers=layers,
                                      num_attention_heads=hidden // 64,
                                      num_key_value_heads=hidden // 128, head_dim=64,
                                      max_position_embeddings=1024)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(model_dir: Path, out: Path, seed: int, targets=tuple(ALL_LINEAR)) -> Path:
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    targets = list(targets)
    model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                      init_lora_weights=False))
    model.save_pretrained(out)
    return out


def time_steps(engine, batch: int, lora_ids: list[int], steps: int) -> tuple[float, float]:
    """Median seconds of a prefill step (8 tokens for each of `batch` requests) and of a
    decode step (one token each)."""
    from xla_inference.runner.requests import RequestState

    reqs = []
    for i in range(batch):
        req = RequestState(f"r{i}", [3 + i] * 8, 8, [list(range(1 + 8 * i, 9 + 8 * i))], 0)
        req.lora_id = lora_ids[i % len(lora_ids)]
        reqs.append(req)
    prefill, decode = [], []
    for step in range(steps + 1):  # the first of each is not timed
        for r in reqs:
            r.num_computed_tokens = 0
        t0 = time.perf_counter()
        np.asarray(engine.forward([(r, 8) for r in reqs]).logits)
        prefill.append(time.perf_counter() - t0)
        for r in reqs:
            r.num_computed_tokens = 7  # decode the last prompt token over and over
        t0 = time.perf_counter()
        np.asarray(engine.forward([(r, 1) for r in reqs]).logits)
        decode.append(time.perf_counter() - t0)
    return statistics.median(prefill[1:]), statistics.median(decode[1:])


def engine_main(args):
    import jax.numpy as jnp

    from xla_inference.lora.peft import load_adapter
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    root = Path(tempfile.mkdtemp())
    if args.smollm2:
        from xla_inference.loading.default_model import prepare_default_model

        model_dir = prepare_default_model()
    elif args.moe:
        model_dir = save_moe_model(root / "model", args.hidden, args.layers)
    else:
        model_dir = save_model(root / "model", args.hidden, args.layers)
    targets = ALL_LINEAR[:4] if args.moe else ALL_LINEAR
    adapters = [save_adapter(model_dir, root / f"a{i}", i, targets) for i in range(4)]
    precision = Precision.for_platform(jnp.dtype(args.dtype), "cpu")
    ecfg = EngineConfig(num_blocks=8 * args.batch + 8, block_size=8, max_num_tokens=8 * args.batch,
                        max_num_seqs=args.batch, max_model_len=64)
    engines = {}
    for mode in ("base", "lora"):
        model = load(model_dir, precision, quantization=args.quantization)
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
            rounds[mode].append((*time_steps(engine, args.batch, ids, args.steps),
                                 time_steps(engine, 1, ids[:1], args.steps)[1]))
    results = {mode: tuple(statistics.median(r[k] for r in rs) for k in range(3))
               for mode, rs in rounds.items()}
    (base_p, base_b, base_1), (lora_p, lora_b, lora_1) = results["base"], results["lora"]
    name = "SmolLM2-135M" if args.smollm2 else f"hidden {args.hidden}, {args.layers} layers"
    if args.moe:
        name += " Qwen3-MoE (32 experts, top 4), adapters on q/k/v/o only"
    if args.quantization:
        name += f", --quantization {args.quantization} (both engines)"
    on = "/".join(t.removesuffix("_proj") for t in targets)
    print(f"{name}, {args.dtype}, 4 adapters r16 on {on}, one per request; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"batch {args.batch} prefill step ({8 * args.batch} tokens): base {base_p * 1e3:.2f} ms, "
          f"LoRA mixed {lora_p * 1e3:.2f} ms -> throughput {base_p / lora_p:.2f}x of base")
    print(f"batch {args.batch} decode step: base {base_b * 1e3:.2f} ms, LoRA mixed "
          f"{lora_b * 1e3:.2f} ms -> throughput {base_b / lora_b:.2f}x of base")
    print(f"batch 1 decode step (TPOT): base {base_1 * 1e3:.2f} ms, LoRA {lora_1 * 1e3:.2f} ms "
          f"-> +{(lora_1 / base_1 - 1) * 100:.0f}%")


# -- through vllm.LLM on SmolLM2 ------------------------------------------------------------
def _prompts(n: int, length: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": p} for p in rng.integers(100, 49000, size=(n, length)).tolist()]


def vllm_child(args) -> dict:
    """One engine (plain, or --enable-lora), its passes timed: {pass kind: [seconds]}."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    lora = args.child == "lora"
    extra = dict(enable_lora=True, max_loras=4, max_lora_rank=16, max_cpu_loras=4) if lora else {}
    llm = LLM(model=args.model_dir, dtype=args.dtype, seed=0, max_num_seqs=args.num_prompts,
              max_model_len=args.input_len + args.output_len + 16,
              max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory_bytes=1 << 30, **extra)
    compiles_at_ready = llm.collective_rpc("num_compilations")[0]
    adapters = [LoRARequest(f"a{i}", i, path) for i, path in enumerate(args.adapters, start=1)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    one = SamplingParams(temperature=0.0, max_tokens=args.tpot_tokens, ignore_eos=True)
    kinds = {"base": None, "base_b1": None}
    if lora:
        kinds.update(mixed=adapters, mixed_b1=adapters[:1])
    times = {k: [] for k in kinds}
    seed = 0
    for r in range(args.rounds + 1):  # round 0 warms up (and loads the adapters)
        for kind, chosen in kinds.items():
            seed += 1
            b1 = kind.endswith("_b1")
            prompts = _prompts(1 if b1 else args.num_prompts, args.input_len, seed)
            loras = None if chosen is None else [chosen[i % len(chosen)] for i in range(len(prompts))]
            t0 = time.perf_counter()
            outs = llm.generate(prompts, one if b1 else params, lora_request=loras, use_tqdm=False)
            seconds = time.perf_counter() - t0
            assert all(len(o.outputs[0].token_ids) == (one if b1 else params).max_tokens
                       for o in outs)
            if r:
                times[kind].append(seconds)
            print(f"{args.child} round {r} {kind}: {seconds:.2f}s", file=sys.stderr, flush=True)
    compiles = llm.collective_rpc("num_compilations")[0] - compiles_at_ready
    llm.llm_engine.engine_core.shutdown()
    return dict(times=times, compilations_after_warmup=compiles)


def vllm_main(args) -> None:
    from xla_inference.loading.default_model import prepare_default_model

    model_dir = prepare_default_model()
    root = Path(tempfile.mkdtemp())
    adapters = [str(save_adapter(model_dir, root / f"a{i}", i)) for i in range(4)]
    results = {}
    for child in args.order.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", child, "--model-dir",
               str(model_dir), "--adapters", *adapters]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"{child} failed (its log is above)")
        results.setdefault(child, []).append(json.loads(line[0][7:]))
        print(child, json.dumps(results[child][-1]), flush=True)
    # A child run twice (plain,lora,plain brackets the LoRA run): medians over both runs.
    med = {f"{c}.{k}": statistics.median(t for r in rs for t in r["times"][k])
           for c, rs in results.items() for k in rs[0]["times"]}
    tokens = args.num_prompts * args.output_len
    print(f"SmolLM2-135M {args.dtype}, {args.num_prompts} prompts x {args.input_len} tokens -> "
          f"{args.output_len}, 4 adapters r16 on q/k/v/o/gate/up/down; load average "
          f"{os.getloadavg()[0]:.2f}")
    for name, t in med.items():
        per = t / args.tpot_tokens * 1e3 if name.endswith("_b1") else tokens / t
        print(f"  {name:16s} median {t:7.2f}s -> " + (f"TPOT {per:.2f} ms" if name.endswith("_b1")
                                                    else f"{per:.1f} output tok/s"))
    if "lora" in results:
        for base in ("plain.base", "lora.base"):
            if base in med:
                print(f"mixed LoRA throughput / {base}: {med[base] / med['lora.mixed']:.2f}x; "
                      f"batch-1 TPOT overhead +{(med['lora.mixed_b1'] / med[base + '_b1'] - 1) * 100:.0f}%")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smollm2", action="store_true", help="engine mode on SmolLM2-135M")
    ap.add_argument("--moe", action="store_true",
                    help="engine mode on a Qwen3-MoE-shaped model, adapters on attention only")
    ap.add_argument("--vllm", action="store_true", help="offline throughput through vllm.LLM")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", default=None,
                    help="engine mode: online quantization (int8, fp8) of base and LoRA engines")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--tpot-tokens", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--order", default="plain,lora", help="child engines, in this order")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--adapters", nargs="*", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(vllm_child(args)), flush=True)
    elif args.vllm:
        vllm_main(args)
    else:
        engine_main(args)


if __name__ == "__main__":
    main()
