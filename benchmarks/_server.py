"""Start a vLLM OpenAI server, wait until /health answers, stop it with all its processes.

Shared by benchmarks/serving.py and benchmarks/startup.py. The server runs in its own
session (process group), so stopping it reaches the API server and the engine core alike:
SIGINT to the group, a grace period, then SIGKILL. Also: the compressed-tensors W8A8 int8
checkpoint of the default model that vLLM's CPU backend serves (prepare_w8a8_model), its
AWQ 4-bit checkpoint (prepare_awq_model), and a checkpoint's weight bytes at a served dtype
(checkpoint_weight_bytes).
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

from pathlib import Path

from xla_inference.loading.default_model import DEFAULT_MODEL_NAME, model_cache_dir

_W8A8_MARKER = ".w8a8_complete"
_AWQ_MARKER = ".awq_complete"
# SmolLM2-135M's hidden size 576 is no multiple of AWQ's usual 128 (AutoAWQ and vLLM
# refuse such a group size): 64 divides every input size (576, 1536).
AWQ_GROUP_SIZE = 64


def xla_serve_cmd(*args: str) -> list[str]:
    """The README's serve command (prepares and serves the default model by itself)."""
    return [sys.executable, "-m", "xla_inference.cli", "serve", *args]


def vllm_serve_cmd(model_dir: str, *args: str) -> list[str]:
    """vLLM's own server, serving `model_dir` under the default model's name."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", DEFAULT_MODEL_NAME, *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: str, n: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies do not count)."""
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _wait_gone(proc: subprocess.Popen, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        proc.poll()  # reap the direct child
        if not _group_alive(proc.pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGINT the server's process group, wait `grace` seconds, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10.0)):
        if not _group_alive(proc.pid):
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if _wait_gone(proc, wait):
            break
        print(f"server group {proc.pid} still alive after {signal.Signals(sig).name}",
              file=sys.stderr, flush=True)
    proc.wait()


def wait_ready(proc: subprocess.Popen, port: int, log_path: str, timeout: float,
               t0: float) -> float:
    """Poll /health until it answers 200; return seconds since `t0` (the launch)."""
    url = f"http://127.0.0.1:{port}/health"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready; "
                               f"log {log_path}:\n{log_tail(log_path)}")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"server not ready after {timeout:.0f}s; log {log_path}:\n"
                               f"{log_tail(log_path)}")
        time.sleep(0.5)


@contextmanager
def server(cmd: list[str], port: int, log_path: str, env: dict | None = None,
           timeout: float = 1800.0):
    """Launch `cmd` (it must listen on `port`), yield the seconds it took to be ready,
    and stop it (with its engine processes) on the way out, whatever happened."""
    # A SIGTERM to this script must still stop the server: turn it into SystemExit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with open(log_path, "w") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield wait_ready(proc, port, log_path, timeout, t0)
    finally:
        stop(proc)


def prepare_w8a8_model(float_dir: str | Path) -> Path:
    """The default model with every decoder projection quantized to compressed-tensors W8A8
    int8 (symmetric per-channel int8 weights, scale max|w| / 127; dynamic per-token int8
    activations; the tied embedding / lm_head left as is), written by compressed_tensors
    the way llm-compressor saves it. Built once under the cache
    (models/SmolLM2-135M-Instruct-w8a8)."""
    out = model_cache_dir(DEFAULT_MODEL_NAME + "-w8a8")
    if (out / _W8A8_MARKER).is_file():
        return out
    import shutil

    import torch
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme, apply_quantization_config)

    staging = out.with_name(out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(float_dir),
                                                              dtype=torch.float32)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True),
        input_activations=QuantizationArgs(num_bits=8, type="int", strategy="token",
                                           symmetric=True, dynamic=True))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme},
                                                        ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "quantization_scheme", None) is not None:
                absmax = module.weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
                module.weight_scale.copy_((absmax / 127).reshape(module.weight_scale.shape))
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.zero_()
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(str(staging))
    compressor.update_config(str(staging))
    for f in Path(float_dir).iterdir():  # tokenizer and generation config
        if f.is_file() and not f.name.startswith(".") and f.suffix != ".safetensors" \
                and not (staging / f.name).exists():
            shutil.copy(f, staging / f.name)
    (staging / _W8A8_MARKER).write_text("1")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def prepare_awq_model(float_dir: str | Path) -> Path:
    """The default model with every decoder projection quantized to AWQ 4-bit (AutoAWQ's
    gemm packing, group size AWQ_GROUP_SIZE, zero points, quant_method "awq"; the tied
    embedding / lm_head left as is), written by the tests' AWQ writer
    (tests/quantization/checkpoints.save_awq). Round-to-nearest min/max per group, no
    activation-aware calibration: a checkpoint for speed, its quality below a calibrated
    AWQ's. Built once under the cache (models/SmolLM2-135M-Instruct-awq)."""
    out = model_cache_dir(DEFAULT_MODEL_NAME + "-awq")
    if (out / _AWQ_MARKER).is_file():
        return out
    import shutil

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.quantization.checkpoints import save_awq

    with open(Path(float_dir) / "config.json") as f:
        num_layers = json.load(f)["num_hidden_layers"]
    staging = out.with_name(out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    save_awq(staging, base=Path(float_dir), group_size=AWQ_GROUP_SIZE, num_layers=num_layers,
             with_reference=False)
    for f in staging.iterdir():  # the float directory's own build marker
        if f.name.startswith("."):
            f.unlink()
    (staging / _AWQ_MARKER).write_text("1")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "F64": 8, "F32": 4, "BF16": 2,
             "F16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I32": 4, "I64": 8}


def checkpoint_weight_bytes(model_dir: str | Path, dtype: str) -> int:
    """Bytes of a safetensors checkpoint's tensors as served at `dtype`: floating tensors at
    its size (auto: as stored), integer and fp8 ones as stored."""
    total = 0
    for file in Path(model_dir).glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for n in info["shape"]:
                numel *= n
            floating = info["dtype"] in ("F64", "F32", "BF16", "F16")
            size = _ITEMSIZE.get(dtype, _ITEMSIZE[info["dtype"]]) if floating \
                else _ITEMSIZE[info["dtype"]]
            total += numel * size
    return total
