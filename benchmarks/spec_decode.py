"""n-gram speculative decoding vs none on SmolLM2 (prepare_default_model), one process per
configuration, same prompts: batch-1 TPOT on a copy-heavy prompt (a passage, then the
instruction to repeat it with one edit) and batch-N throughput on the same kind of prompts.
Greedy, float32, one untimed warm-up pass, then `--repeats` timed passes; medians.

    .venv/bin/python benchmarks/spec_decode.py --k 4 --batch 64 --max-tokens 64
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

PASSAGE = ("The old lighthouse stood at the edge of the cliff, its white paint peeling in "
           "long strips. Every evening the keeper climbed the spiral stairs, trimmed the wick, "
           "and watched the ships pass safely through the narrow channel below. ")


def _prompt(i: int) -> str:
    passage = PASSAGE.replace("old", ["old", "tall", "lonely", "ancient"][i % 4])
    return (f"Here is a passage:\n\n{passage}\n\nRepeat the passage exactly, word for word, "
            f"but replace 'keeper' with 'guardian'.\n\nPassage:\n")


def run(spec_k: int, batch: int, max_tokens: int, repeats: int) -> dict:
    from vllm import LLM, SamplingParams

    from xla_inference.loading.default_model import prepare_default_model

    spec = None
    if spec_k:
        spec = {"method": "ngram", "num_speculative_tokens": spec_k, "prompt_lookup_max": 4,
                "prompt_lookup_min": 2}
    llm = LLM(model=str(prepare_default_model()), dtype="float32", max_model_len=1024,
              max_num_seqs=max(batch, 1), seed=0, speculative_config=spec)
    tokenizer = llm.get_tokenizer()
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def generate(prompts):
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        t0 = time.perf_counter()
        outs = llm.generate(chats, sp, use_tqdm=False)
        return time.perf_counter() - t0, outs

    generate([_prompt(0)])  # warm-up: compiles the verify program
    generate([_prompt(i) for i in range(batch)])
    single, many, text = [], [], None
    for _ in range(repeats):
        seconds, outs = generate([_prompt(1)])
        single.append(seconds / max_tokens)
        text = outs[0].outputs[0].text
        seconds, outs = generate([_prompt(i) for i in range(batch)])
        many.append(sum(len(o.outputs[0].token_ids) for o in outs) / seconds)
    return {"k": spec_k, "tpot_batch1_s": statistics.median(single),
            "tokens_per_s_batch": statistics.median(many), "text": text}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", type=int, default=None)
    args = parser.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(run(args.child, args.batch, args.max_tokens, args.repeats)))
        return
    results = {}
    for k in (0, args.k):
        out = subprocess.run([sys.executable, __file__, "--child", str(k), "--batch",
                              str(args.batch), "--max-tokens", str(args.max_tokens),
                              "--repeats", str(args.repeats)], capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            sys.exit(f"k={k} failed:\n{out.stderr[-3000:]}")
        results[k] = json.loads(line[0][7:])
    base, spec = results[0], results[args.k]
    print(f"batch-1 TPOT: none {base['tpot_batch1_s'] * 1e3:.1f} ms, n-gram k={args.k} "
          f"{spec['tpot_batch1_s'] * 1e3:.1f} ms -> "
          f"{base['tpot_batch1_s'] / spec['tpot_batch1_s']:.2f}x")
    print(f"batch-{args.batch} throughput: none {base['tokens_per_s_batch']:.0f} tok/s, n-gram "
          f"{spec['tokens_per_s_batch']:.0f} tok/s -> "
          f"{spec['tokens_per_s_batch'] / base['tokens_per_s_batch']:.2f}x")
    print("same greedy text:", base["text"] == spec["text"])


if __name__ == "__main__":
    main()
