"""Run a benchmark once per backend, each in a child process of its own (vLLM picks its
platform once per process), and collect what each child reports.

Shared by benchmarks/embeddings.py and benchmarks/multimodal.py. The child is the same
script started again with `--backend NAME` and the parent's own arguments; it prints its
result as one line, `RESULT <json>` (print_result), and the parent reads it back
(run_backends). VLLM_PLUGINS=none makes the `vllm-cpu` child run vLLM's own CPU backend.
"""

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping

_PREFIX = "RESULT "


def print_result(result: dict) -> None:
    """The child's side: its result as the line the parent looks for."""
    print(_PREFIX + json.dumps(result), flush=True)


def run_backends(script: str, backends: Iterable[str],
                 extra_env: Mapping[str, str] | None = None) -> Iterator[tuple[str, dict]]:
    """Runs `script` with `--backend NAME` and this process's arguments, once per backend in
    turn, offline (HF_HUB_OFFLINE=1) and with `extra_env`; yields (backend, its result) for
    each that exited cleanly with a RESULT line, and prints that a backend failed, with its
    stderr's tail, for one that did not."""
    for backend in backends:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(extra_env or {})}
        if backend == "vllm-cpu":
            env["VLLM_PLUGINS"] = "none"
        cmd = [sys.executable, script, "--backend", backend, *sys.argv[1:]]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith(_PREFIX)]
        if proc.returncode != 0 or not line:
            print(f"{backend}: failed\n{proc.stderr[-3000:]}")
            continue
        yield backend, json.loads(line[0][len(_PREFIX):])
