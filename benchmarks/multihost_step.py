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


def child(mode: str, tp: int, dp: int, repeats: int, model_dir: str, pp: int = 1) -> None:
    from tests.e2e.engines import generate_ids, shutdown, start_llm

    llm = start_llm(model_dir, tensor_parallel_size=tp // pp, pipeline_parallel_size=pp,
                    max_num_seqs=NUM_SEQS, max_num_batched_tokens=16, max_model_len=128,
                    additional_config={"data_parallel_size": dp})
    prompts = [[3 + i, 10 + i, 20 + i, 30 + i] for i in range(NUM_SEQS)]
    params = dict(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
    generate_ids(llm, prompts, **params)  # warm: first runs of each program
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate_ids(llm, prompts, **params)
        times.append((time.perf_counter() - start) / NUM_NEW)
    shutdown(llm)
    print("RESULT " + json.dumps(dict(mode=mode, step_s=statistics.median(times), times=times)),
          flush=True)


def run(mode: str, tp: int, dp: int, repeats: int, model_dir: str,
        pp: int = 1) -> tuple[dict, str]:
    devices = tp * dp if mode == "one" else tp * dp // 2
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    env.pop("XLA_INFERENCE_HOSTS", None)
    if mode == "hosts":
        env["XLA_INFERENCE_HOSTS"] = "2"
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--tp", str(tp),
                           "--dp", str(dp), "--repeats", str(repeats), "--model", model_dir,
                           "--pp", str(pp)],
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
    parser.add_argument("--child")
    parser.add_argument("--model")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.tp, args.dp, args.repeats, args.model, args.pp)
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import transformers

    from tests.helpers import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(save_tiny_model(Path(tmp) / "llama", transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, head_dim=32, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, bos_token_id=1, eos_token_id=2), seed=0))
        load_before = os.getloadavg()
        one, _ = run("one", args.tp, args.dp, args.repeats, model_dir, args.pp)
        hosts, sent = run("hosts", args.tp, args.dp, args.repeats, model_dir, args.pp)
        tp_hosts = (run("hosts", args.tp, args.dp, args.repeats, model_dir)[0]
                    if args.pp > 1 else None)
        load_after = os.getloadavg()
    mesh = f"PP {args.pp} x TP {args.tp // args.pp}" if args.pp > 1 else f"TP {args.tp}"
    mesh = f"DP {args.dp} x {mesh}" if args.dp > 1 else mesh
    print(f"{mesh}: one process {1e3 * one['step_s']:.1f} ms/step, two processes "
          f"{1e3 * hosts['step_s']:.1f} ms/step, ratio {hosts['step_s'] / one['step_s']:.2f} "
          f"(medians of {args.repeats}; {NUM_SEQS} sequences decoding)")
    if tp_hosts is not None:
        print(f"two processes at TP {args.tp}: {1e3 * tp_hosts['step_s']:.1f} ms/step; {mesh} "
              f"against it {hosts['step_s'] / tp_hosts['step_s']:.2f}")
    print(f"driver: {sent}")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}")


if __name__ == "__main__":
    main()
