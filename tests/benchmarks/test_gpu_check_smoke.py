"""benchmarks/gpu_check.sh --smoke on this CPU: the accelerator check's every part runs
(dependency and device check, the kernel tests' lowering subset, the kernel check against
the jnp kernel in interpret mode, kernel-alone timings, the core engine's decode and
prefill steps, the MoE parts: on 2 virtual devices the
sharded one too) and reports, so that the command handed to a GPU or TPU machine is known to
work end to end before one is at hand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_runs_every_part(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    for line in ["== kernel tests (cpu", " passed", "kernel check (pallas_gpu_attention, "
                 "interpret)", "-> PASS", "kernel alone, decode b1", "decode b4 ctx160",
                 "MFU", "experts split over 2 devices", "no all-gather, outputs agree",
                 "accelerator_step: OK", "== gpu_check: OK"]:
        assert line in log, f"{line!r} missing from:\n{log}"
    report = json.loads(out.read_text())
    assert report["kernel"]["passed"] and report["kernel"]["max_abs_error"] < 2e-2
    cases = [row["case"] for row in report["engine"]["rows"]]
    assert cases == ["decode b1 ctx64", "decode b1 ctx160", "prefill 64", "decode b4 ctx64",
                     "decode b4 ctx160"]
    assert report["engine"]["skipped_for_time"] == []
    assert all(row["seconds"] > 0 for row in report["engine"]["rows"])


def test_gpu_check_refuses_a_cpu_without_smoke():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no accelerator" in proc.stdout
