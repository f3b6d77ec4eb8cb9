"""The torch path (vLLM's PyTorch model class lowered through torchax, --model-impl vllm)
against the native JAX family (--model-impl native) on the same model, through vllm.LLM,
in one run: offline throughput (N prompts of random ids, greedy, ignore_eos; one untimed
pass, then `--repeats` timed passes, median) and batch-1 TPOT (one prompt of
--tpot-input-len ids: the time to generate --tpot-output-len + 1 tokens less the time to
generate 1, over --tpot-output-len; median of `--repeats`). Each implementation runs in
its own process. vllm-cpu (vLLM's own CPU backend, VLLM_PLUGINS=none) can be added.

    .venv/bin/python benchmarks/torch_path.py                    # SmolLM2, 64x200->128
    .venv/bin/python benchmarks/torch_path.py --impls native,vllm,vllm-cpu --dtype bfloat16
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

IMPLS = ("native", "vllm", "vllm-cpu")


def _prompts(n, length, vocab, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab - 100, size=(n, length)).tolist()


def _timed_generate(llm, prompts, max_tokens) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    return elapsed


def _child(args) -> dict:
    from vllm import LLM

    from xla_inference.loading.default_model import prepare_default_model

    impl = {} if args.child == "vllm-cpu" else {"model_impl": args.child}
    t0 = time.perf_counter()
    llm = LLM(model=args.model or str(prepare_default_model()), dtype=args.dtype,
              max_model_len=max(args.input_len + args.output_len,
                                args.tpot_input_len + args.tpot_output_len) + 16,
              max_num_seqs=args.num_prompts, max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory_bytes=args.kv_cache_gib << 30, seed=0, **impl)
    startup = time.perf_counter() - t0
    ours = args.child != "vllm-cpu"
    compiles_at_ready = llm.collective_rpc("num_compilations")[0] if ours else None
    offline = []
    for i in range(args.repeats + 1):  # new prompts each pass: no prefix-cache hits
        prompts = _prompts(args.num_prompts, args.input_len, 49152, seed=i)
        seconds = _timed_generate(llm, prompts, args.output_len)
        print(f"{args.child} offline pass {i}: {seconds:.1f}s", file=sys.stderr, flush=True)
        if i:
            offline.append(seconds)
    tpot = []
    for i in range(args.repeats + 1):
        prompt = _prompts(1, args.tpot_input_len, 49152, seed=100 + i)
        first = _timed_generate(llm, prompt, 1)
        prompt = _prompts(1, args.tpot_input_len, 49152, seed=200 + i)
        whole = _timed_generate(llm, prompt, args.tpot_output_len + 1)
        if i:
            tpot.append((whole - first) / args.tpot_output_len)
    result = dict(startup_s=startup, offline_s=offline, tpot_s=tpot,
                  output_tok_s=args.num_prompts * args.output_len / statistics.median(offline),
                  tpot_ms=1000 * statistics.median(tpot))
    if ours:
        result["compilations_after_warmup"] = (llm.collective_rpc("num_compilations")[0]
                                               - compiles_at_ready)
    return result


def _launch(impl: str, argv: list[str]) -> dict:
    env = dict(os.environ)
    if impl == "vllm-cpu":
        env["VLLM_PLUGINS"] = "none"
    cmd = [sys.executable, __file__, "--child", impl, *argv]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{impl} failed (its log is above):\n{proc.stdout[-3000:]}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--impls", default="native,vllm",
                   help="any of native (our JAX family), vllm (the torch path), vllm-cpu "
                        "(vLLM's own CPU backend)")
    p.add_argument("--model", default=None, help="model dir (default: the embedded SmolLM2)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--tpot-input-len", type=int, default=512)
    p.add_argument("--tpot-output-len", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return
    impls = args.impls.split(",")
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise SystemExit(f"unknown implementations {unknown} (choose from {', '.join(IMPLS)})")
    argv = [a for a in sys.argv[1:]]
    results = {}
    for impl in impls:
        results[impl] = r = _launch(impl, argv)
        print(f"{impl:9s} dtype={args.dtype}: offline {r['output_tok_s']:7.1f} output tok/s, "
              f"batch-1 TPOT {r['tpot_ms']:6.1f} ms  {json.dumps(r)}", flush=True)
    for impl in results:
        for base in results:
            if impl != base and base != "vllm":
                a, b = results[impl], results[base]
                print(f"{impl} / {base}: offline {a['output_tok_s'] / b['output_tok_s']:.2f}x, "
                      f"TPOT {b['tpot_ms'] / a['tpot_ms']:.2f}x (speed)")


if __name__ == "__main__":
    main()
