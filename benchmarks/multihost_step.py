"""Per-step cost of the multi-host path (distributed/multihost.py) against one process at the same
tensor parallel size, through vllm.LLM on a tiny Llama (made here; 2 layers, hidden 64), so
the step is mostly overhead and the difference shows. --pp P: the same devices as P pipeline
stages of TP/P each (parallel/pipeline.py; across two processes one stage per process), in
one process and in two, and then two processes at TP (no stages): PP against TP across hosts.

Run: PYTHONPATH=. .venv/bin/python benchmarks/multihost_step.py [--tp 8] [--dp 1] [--pp 1] [--repeats 3]

  one:  one JAX process with DP x TP virtual CPU devices (XLA_FLAGS device count);
  hosts: two JAX processes with DP x TP / 2 devices each (XLA_INFERENCE_HOSTS=2), joined by
         jax.distributed; the collectives between them are gloo over TCP, and each step the
         driver sends its SchedulerOutput to the follower. With --dp 2 (data parallel
         replicas, additional_config) each process holds one replica: only the step's
         replicated outputs cross processes.
--workload picks what the engine runs (default decode, the above), each on a tiny model
made here: ngram (speculative decoding, n-gram drafts of 3 tokens on repeating prompts) and
eagle3 (an EAGLE-3 head of 3 drafts, tests/eagle3_checkpoint.py) time a decode position as
decode does, and report the drafts accepted; embed (a Qwen3 embedder, runner pooling, 16
prompts of 24 tokens through LLM.embed) times one embed call.
Each mode runs in a child process of its own (one engine at a time), one after the other;
prints the median seconds per decode step (4 sequences, 64 tokens each, greedy) of
--repeats generations after a warm-up one, their ratio, the bytes and microseconds of the
per-step message (the driver's log at shutdown) and the load average. All processes share
this machine's cores: the ratio is what the cross-process path costs on one host, not what
two real hosts would see (there the follower's compute is its own and the TCP hops cross a
network).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NUM_SEQS, NUM_NEW = 4, 64


WORKLOADS = ("decode", "ngram", "eagle3", "embed")
NUM_SPECULATIVE = 3
EMBED_PROMPTS, EMBED_LEN = 16, 24


def child(mode: str, tp: int, dp: int, repeats: int, model_dir: str, pp: int = 1,
          workload: str = "decode", head_dir: str | None = None) -> None:
    from tests.e2e.engines import generate_ids, metric, shutdown, start_llm

    extra = {}
    if workload == "ngram":
        extra["speculative_config"] = {"method": "ngram", "num_speculative_tokens": NUM_SPECULATIVE,
                                       "prompt_lookup_max": 3, "prompt_lookup_min": 2}
    elif workload == "eagle3":
        extra["speculative_config"] = {"method": "eagle3", "model": head_dir,
                                       "num_speculative_tokens": NUM_SPECULATIVE}
    elif workload == "embed":
        extra = dict(runner="pooling", convert="embed", max_num_seqs=EMBED_PROMPTS,
                     max_num_batched_tokens=EMBED_PROMPTS * EMBED_LEN)
    args = dict(tensor_parallel_size=tp // pp, pipeline_parallel_size=pp,
                max_num_seqs=NUM_SEQS, max_num_batched_tokens=16, max_model_len=128,
                additional_config={"data_parallel_size": dp})
    llm = start_llm(model_dir, **{**args, **extra})
    if workload == "embed":
        prompts = [{"prompt_token_ids": [(3 + 7 * i + j) % 120 + 3 for j in range(EMBED_LEN)]}
                   for i in range(EMBED_PROMPTS)]
        run_once = lambda: llm.embed(prompts, use_tqdm=False)  # noqa: E731
        per = 1
    else:
        # Speculation: repeating prompts, whose continuation n-gram drafts find (the greedy
        # tiny models fall into loops, which the EAGLE-3 echo head half predicts).
        repeat = 1 if workload == "decode" else 3
        prompts = [[3 + i, 10 + i, 20 + i, 30 + i] * repeat for i in range(NUM_SEQS)]
        params = dict(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
        run_once = lambda: generate_ids(llm, prompts, **params)  # noqa: E731
        per = NUM_NEW
    run_once()  # warm: first runs of each program
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_once()
        times.append((time.perf_counter() - start) / per)
    spec = {}
    if "speculative_config" in extra:
        spec = dict(accepted=metric(llm, "vllm:spec_decode_num_accepted_tokens"),
                    drafted=metric(llm, "vllm:spec_decode_num_draft_tokens"))
    shutdown(llm)
    print("RESULT " + json.dumps(dict(mode=mode, step_s=statistics.median(times), times=times,
                                      **spec)), flush=True)


def run(mode: str, tp: int, dp: int, repeats: int, model_dir: str,
        pp: int = 1, workload: str = "decode", head_dir: str = "") -> tuple[dict, str]:
    devices = tp * dp if mode == "one" else tp * dp // 2
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    env.pop("XLA_INFERENCE_HOSTS", None)
    if mode == "hosts":
        env["XLA_INFERENCE_HOSTS"] = "2"
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--tp", str(tp),
                           "--dp", str(dp), "--repeats", str(repeats), "--model", model_dir,
                           "--pp", str(pp), "--workload", workload, "--head", head_dir],
                          env=env, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-4000:]}")
    sent = re.search(r"steps sent to .*", proc.stderr)
    return json.loads(lines[0][7:]), sent.group(0) if sent else ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (of TP/PP devices)")
    parser.add_argument("--workload", choices=WORKLOADS, default="decode")
    parser.add_argument("--child")
    parser.add_argument("--model")
    parser.add_argument("--head", default="")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.tp, args.dp, args.repeats, args.model, args.pp,
                     args.workload, args.head or None)
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import transformers

    from tests.helpers import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        head_dir = ""
        if args.workload == "embed":
            from tests.pooling_models import save_tiny_qwen3_embedder

            model_dir = str(save_tiny_qwen3_embedder(Path(tmp) / "embedder"))
        elif args.workload == "eagle3":
            from safetensors.numpy import load_file

            from tests.eagle3_checkpoint import save_tiny_eagle3, save_tiny_llama_target

            model_dir = str(save_tiny_llama_target(Path(tmp) / "target"))
            embed = load_file(str(Path(model_dir) / "model.safetensors"))[
                "model.embed_tokens.weight"]
            head_dir = str(save_tiny_eagle3(Path(tmp) / "head", (0, 1, 2), echo_embed=embed))
        else:
            model_dir = str(save_tiny_model(Path(tmp) / "llama", transformers.LlamaConfig(
                vocab_size=128, hidden_size=64, head_dim=32, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, bos_token_id=1, eos_token_id=2), seed=0))
        load_before = os.getloadavg()
        common = dict(workload=args.workload, head_dir=head_dir)
        one, _ = run("one", args.tp, args.dp, args.repeats, model_dir, args.pp, **common)
        hosts, sent = run("hosts", args.tp, args.dp, args.repeats, model_dir, args.pp, **common)
        tp_hosts = (run("hosts", args.tp, args.dp, args.repeats, model_dir, **common)[0]
                    if args.pp > 1 else None)
        load_after = os.getloadavg()
    mesh = f"PP {args.pp} x TP {args.tp // args.pp}" if args.pp > 1 else f"TP {args.tp}"
    mesh = f"DP {args.dp} x {mesh}" if args.dp > 1 else mesh
    unit, what = (("ms/embed call", f"{EMBED_PROMPTS} prompts of {EMBED_LEN} tokens embedded")
                  if args.workload == "embed" else
                  ("ms/step", f"{NUM_SEQS} sequences decoding, {args.workload}"))
    print(f"{mesh}: one process {1e3 * one['step_s']:.1f} {unit}, two processes "
          f"{1e3 * hosts['step_s']:.1f} {unit}, ratio {hosts['step_s'] / one['step_s']:.2f} "
          f"(medians of {args.repeats}; {what})")
    for name, result in (("one process", one), ("two processes", hosts)):
        if "accepted" in result:
            print(f"{name}: {result['accepted']:.0f} of {result['drafted']:.0f} drafts accepted "
                  f"(warm-up and repeats); each run's times: "
                  + ", ".join(f"{1e3 * t:.1f}" for t in result["times"]))
    if tp_hosts is not None:
        print(f"two processes at TP {args.tp}: {1e3 * tp_hosts['step_s']:.1f} ms/step; {mesh} "
              f"against it {hosts['step_s'] / tp_hosts['step_s']:.2f}")
    print(f"driver: {sent}")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}")


if __name__ == "__main__":
    main()
