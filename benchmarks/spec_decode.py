"""Speculative decoding against none on SmolLM2 (prepare_default_model), engines alive side by
side in one process and timed alternately (the machine's load changes between minutes, not
between two calls), greedy, medians of `--repeats` timed passes after one untimed pass:

- batch-1 TPOT on a copy-heavy prompt (a passage, then the instruction to repeat it with one
  edit): (time for --max-tokens tokens - time for 1 token) / (--max-tokens - 1), for no
  speculation, n-gram with k drafts, and (--draft-layers > 0) a draft model: SmolLM2's first
  --draft-layers layers with its embeddings, norm and head (a smaller model of the same
  vocabulary, written next to the prepared model);
- batch-N throughput (output tokens / s) on N such prompts, for none and n-gram;
  with --data-parallel R, both engines serve R data parallel replicas (additional_config
  data_parallel_size, one vLLM scheduler per replica, N / R sequences each; on the CPU
  over R virtual devices, XLA_FLAGS set here) and the rows each replica ran are printed.

Each part builds engines sized for it (batch 1: one sequence, buckets up to
--max-num-batched-tokens; batch N: N sequences), so warm-up compiles few buckets. Prints the
ratios, the drafts' acceptance (vLLM's per-request spec-decode metrics) and whether the
greedy texts with speculation equal the text without (bfloat16 on the CPU: not always, a
near tie between two tokens can flip between a 1-token and a 16-token step; float32: equal).

    .venv/bin/python benchmarks/spec_decode.py --k 4 --batch 64 --max-tokens 64 --dtype bfloat16
    .venv/bin/python benchmarks/spec_decode.py --parts batchN --data-parallel 2 --batch 64
"""

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

PASSAGE = ("The old lighthouse stood at the edge of the cliff, its white paint peeling in "
           "long strips. Every evening the keeper climbed the spiral stairs, trimmed the wick, "
           "and watched the ships pass safely through the narrow channel below. In winter the "
           "storms rolled in from the north, and the keeper kept the lamp burning all night. ")


def _prompt(i: int) -> str:
    passage = PASSAGE.replace("old", ["old", "tall", "lonely", "ancient"][i % 4])
    return (f"Here is a passage:\n\n{passage}\n\nRepeat the passage exactly, word for word, "
            f"but replace 'keeper' with 'guardian'.\n\nPassage:\n")


def _truncated_drafter(target: Path, num_layers: int) -> Path:
    """SmolLM2's first num_layers layers, embeddings, final norm and head as a model dir."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    out = target.parent / f"{target.name}-first{num_layers}layers"
    if (out / "model.safetensors").exists():
        return out
    out.mkdir(exist_ok=True)
    for f in target.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((target / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    (out / "config.json").write_text(json.dumps(config, indent=1))
    weights = load_file(str(target / "model.safetensors"))
    kept = {}
    for name, w in weights.items():
        parts = name.split(".")
        if "layers" in parts and int(parts[parts.index("layers") + 1]) >= num_layers:
            continue
        kept[name] = np.ascontiguousarray(w)
    save_file(kept, str(out / "model.safetensors"))
    return out


class Engine:
    def __init__(self, name: str, spec, model: str, args, max_num_seqs: int, max_batched: int):
        from vllm import LLM

        t0 = time.perf_counter()
        self.name = name
        self.llm = LLM(model=model, dtype=args.dtype, max_model_len=args.max_model_len,
                       max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched,
                       kv_cache_memory_bytes=args.kv_cache_mib << 20, seed=0,
                       speculative_config=spec, enable_prefix_caching=False,
                       per_request_spec_decode_metrics="summary" if spec else "none",
                       **_data_parallel(args))
        self.accepted = self.drafted = 0  # drafts of the timed passes (per request metrics)
        self.startup_s = time.perf_counter() - t0
        tokenizer = self.llm.get_tokenizer()
        self.chat = lambda p: tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)

    def generate(self, prompts: list[str], max_tokens: int):
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        chats = [self.chat(p) for p in prompts]
        t0 = time.perf_counter()
        outs = self.llm.generate(chats, sp, use_tqdm=False)
        seconds = time.perf_counter() - t0
        for o in outs:
            m = o.outputs[0].spec_decode_metrics
            if m is not None:
                self.accepted += sum(j * n for j, n in enumerate(m.histogram))
                self.drafted += m.num_draft_tokens
        return seconds, outs

    def acceptance(self) -> tuple[float, float]:
        """Drafts accepted and drafted so far (vLLM's counters on /metrics are the
        process's, and only the last engine started keeps them)."""
        return self.accepted, self.drafted

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()


def _data_parallel(args) -> dict:
    if args.data_parallel == 1:
        return {}
    return {"additional_config": {"data_parallel_size": args.data_parallel}}


def _specs(args, model: Path) -> dict:
    specs = {"none": None,
             f"ngram k={args.k}": {"method": "ngram", "num_speculative_tokens": args.k,
                                   "prompt_lookup_max": 4, "prompt_lookup_min": 2}}
    if args.draft_layers:
        drafter = _truncated_drafter(model, args.draft_layers)
        specs[f"draft_model {args.draft_layers} layers k={args.draft_k}"] = {
            "method": "draft_model", "model": str(drafter),
            "num_speculative_tokens": args.draft_k}
    return specs


def _alternate(engines, repeats: int, measure) -> dict:
    """measure(engine) per engine, engines in turn, one untimed round then `repeats`;
    -> name -> (median, all values, acceptance (accepted, drafted) of the timed rounds)."""
    for e in engines:
        measure(e)
    values = {e.name: [] for e in engines}
    counts = {e.name: [0.0, 0.0] for e in engines}
    for _ in range(repeats):
        for e in engines:
            before = e.acceptance()
            values[e.name].append(measure(e))
            for i, (a, b) in enumerate(zip(before, e.acceptance())):
                counts[e.name][i] += b - a
    return {e.name: (statistics.median(values[e.name]), values[e.name], tuple(counts[e.name]))
            for e in engines}


def batch1(args, model: Path) -> dict:
    engines = [Engine(name, spec, str(model), args, 1, args.max_num_batched_tokens)
               for name, spec in _specs(args, model).items()]
    texts = {}

    def tpot(e):
        first, _ = e.generate([_prompt(1)], 1)
        whole, outs = e.generate([_prompt(1)], args.max_tokens)
        texts[e.name] = outs[0].outputs[0].text
        return (whole - first) / (args.max_tokens - 1)

    try:
        result = _alternate(engines, args.repeats, tpot)
    finally:
        for e in engines:
            e.close()
    return {"tpot": result, "texts": texts, "startup_s": {e.name: e.startup_s for e in engines}}


def batch_n(args, model: Path) -> dict:
    specs = {k: v for k, v in _specs(args, model).items() if not k.startswith("draft")}
    seqs = -(-args.batch // args.data_parallel)  # each replica's scheduler's budget
    max_batched = max(args.max_num_batched_tokens, seqs * (args.k + 1))
    engines = [Engine(name, spec, str(model), args, seqs, max_batched)
               for name, spec in specs.items()]
    texts = {}

    def throughput(e):
        seconds, outs = e.generate([_prompt(i) for i in range(args.batch)], args.max_tokens)
        texts[e.name] = [o.outputs[0].text for o in outs]
        return sum(len(o.outputs[0].token_ids) for o in outs) / seconds

    try:
        result = _alternate(engines, args.repeats, throughput)
        rows = {e.name: e.llm.collective_rpc("replica_rows")[0] for e in engines}
    finally:
        for e in engines:
            e.close()
    return {"throughput": result, "texts": texts, "replica_rows": rows}


def _report(name: str, base: str, results: dict, faster_if_smaller: bool, unit: str, scale=1.0):
    median0 = results[base][0]
    for engine, (median, values, (accepted, drafted)) in results.items():
        ratio = median0 / median if faster_if_smaller else median / median0
        accept = f", accepted {accepted:.0f}/{drafted:.0f} drafts" if drafted else ""
        print(f"{name} {engine:28s} {median * scale:8.1f} {unit} (runs "
              f"{', '.join(f'{v * scale:.1f}' for v in values)}) -> {ratio:.2f}x{accept}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--draft-layers", type=int, default=8,
                        help="layers of the truncated SmolLM2 drafter (0: no draft_model)")
    parser.add_argument("--draft-k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-mib", type=int, default=512)
    parser.add_argument("--parts", default="batch1,batchN")
    parser.add_argument("--data-parallel", type=int, default=1,
                        help="data parallel replicas of every engine (CPU: virtual devices)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.data_parallel > 1 and "device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                                   f"platform_device_count={args.data_parallel}").strip()
    from xla_inference.loading.default_model import prepare_default_model

    model = Path(prepare_default_model())
    print(f"load average at start: {os.getloadavg()}", flush=True)
    parts = args.parts.split(",")
    if "batch1" in parts:
        r = batch1(args, model)
        _report("batch-1 TPOT", "none", r["tpot"], True, "ms", 1e3)
        base = r["texts"]["none"]
        print("same greedy text as none:", {k: v == base for k, v in r["texts"].items()})
        for k, v in r["texts"].items():
            print(f"  {k}: {v!r}")
        print("startup s:", {k: round(v, 1) for k, v in r["startup_s"].items()})
        print(f"load average: {os.getloadavg()}", flush=True)
    if "batchN" in parts:
        r = batch_n(args, model)
        replicas = f", {args.data_parallel} replicas" if args.data_parallel > 1 else ""
        _report(f"batch-{args.batch}{replicas} tok/s", "none", r["throughput"], False, "tok/s")
        print("request rows run per replica:", r["replica_rows"])
        base = r["texts"]["none"]
        print("same greedy texts as none:", {k: v == base for k, v in r["texts"].items()})
        print(f"load average: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
