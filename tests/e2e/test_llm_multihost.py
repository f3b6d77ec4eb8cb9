"""vllm.LLM across two JAX processes ("hosts"), 4 virtual CPU devices each, joined by
jax.distributed (distributed/multihost.py): pipeline parallel 2 x tensor parallel 2 (one stage on
each process, parallel/pipeline.stage_devices) and tensor + expert parallel 8 over both (a
tiny MoE) give transformers' greedy output with nothing compiled after warm-up; killing the
follower mid-request ends the engine with an error naming it, well within 60 s. Tensor
parallel 2 over both (one device each) gives it too, each process reading from the
checkpoint file only its device's half of every split tensor. A call
that fails on both processes (an unknown collective_rpc) fails for its caller and the
engine serves on. The server
runs data parallel 2 x tensor parallel 4 over both (one replica per process; through
vllm.LLM, data parallel across processes runs in tests/e2e/test_llm_ray.py)."""

import re
import time

import numpy as np
import psutil
import pytest
from tqdm import tqdm

from tests.e2e.engines import generate_ids, num_compilations, shutdown, start_llm
from tests.helpers import hf_greedy_ids, save_tiny_family, save_tiny_model

pytestmark = pytest.mark.slow

NUM_NEW = 10
FOLLOWER = "xla_inference.distributed.multihost"


def _tiny_llama(path):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, head_dim=32, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    return save_tiny_model(path, config, seed=0)


def _followers() -> list[psutil.Process]:
    """Live follower processes below this one (an exited, unreaped child is none)."""
    def command(p: psutil.Process) -> str:
        try:
            return " ".join(p.cmdline())
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            return ""

    return [p for p in psutil.Process().children(recursive=True) if FOLLOWER in command(p)]


@pytest.fixture
def two_hosts(monkeypatch):
    """Each process of the engine (the driver in vLLM's engine core, the follower it
    spawns) sees 4 devices of its own."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "2")
    monkeypatch.setenv("XLA_INFERENCE_JOIN_TIMEOUT", "300")


def test_pipeline_stages_across_two_processes_then_a_killed_follower_ends_it(
        tmp_path, two_hosts, capfd):
    from vllm import SamplingParams

    model_dir = _tiny_llama(tmp_path / "llama")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (7, 26, 40)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    # Stage 0 on the driver's first two devices, stage 1 on the follower's: each process
    # holds one stage's layer and KV pages; activations cross between them (gloo).
    llm = start_llm(model_dir, pipeline_parallel_size=2, tensor_parallel_size=2, max_num_seqs=4,
                    max_num_batched_tokens=16)
    try:
        assert llm.collective_rpc("mesh_shape")[0] == {"stage": 2, "data": 1, "model": 2}
        assert llm.collective_rpc("mesh_processes")[0] == [0, 0, 1, 1]
        compiled = num_compilations(llm)
        got = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
        assert got == expected
        assert num_compilations(llm) == compiled
        followers = _followers()
        assert len(followers) == 1

        # Mid-request: the follower is killed when the first of six requests finishes (four
        # run at once), the others still to run (a timer raced a fast machine that had
        # finished them all first).
        killed_at = []

        class KillingProgressBar(tqdm):
            def update(self, n=1):
                if not killed_at:
                    followers[0].kill()
                    killed_at.append(time.monotonic())
                return super().update(n)

        with pytest.raises(Exception) as raised:
            llm.generate([{"prompt_token_ids": p} for p in prompts * 2],
                         SamplingParams(temperature=0.0, max_tokens=110, ignore_eos=True),
                         use_tqdm=KillingProgressBar)
        assert killed_at, f"the generation ended before the kill: {raised.value!r}"
        assert time.monotonic() - killed_at[0] < 60
    finally:
        shutdown(llm)
    assert "EngineDead" in type(raised.value).__name__ or "dead" in str(raised.value).lower()
    err = capfd.readouterr().err
    assert "follower process 1" in err and "closed its connection" in err, err[-3000:]
    assert not _followers()


def test_tensor_parallel_2_across_two_processes_each_reading_its_half(tmp_path, monkeypatch,
                                                                     capfd):
    """TP 2, one device on each process: every weight matrix and the embedding are split
    in two, the norms replicated, so each process reads (loading/safetensors.CheckpointSlices,
    counted and logged by each worker) half of every matrix's bytes and all of the norms'."""
    from xla_inference.loading.safetensors import read_safetensors

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "2")
    monkeypatch.setenv("XLA_INFERENCE_JOIN_TIMEOUT", "300")
    model_dir = _tiny_llama(tmp_path / "llama")
    stored = read_safetensors(model_dir / "model.safetensors")
    matrices = sum(t.nbytes for t in stored.values() if t.ndim == 2)
    vectors = sum(t.nbytes for t in stored.values() if t.ndim == 1)
    assert matrices > 20 * vectors
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (7, 26, 40)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    capfd.readouterr()
    llm = start_llm(model_dir, tensor_parallel_size=2, max_num_seqs=4, max_num_batched_tokens=16)
    try:
        assert llm.collective_rpc("mesh_processes")[0] == [0, 1]
        got = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
        assert got == expected
        # A call that fails on every process fails for its caller alone, as on one host
        # (the follower used to die of it, and the engine with it).
        with pytest.raises(Exception, match="no_such_method"):
            llm.collective_rpc("no_such_method")
        assert generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW,
                            ignore_eos=True) == expected
    finally:
        shutdown(llm)
    out = capfd.readouterr()
    reads = dict(re.findall(r"process (\d) read (\d+) bytes of checkpoint tensors",
                            out.out + out.err))
    assert reads == {"0": str(matrices // 2 + vectors), "1": str(matrices // 2 + vectors)}, reads


def test_a_quantized_checkpoint_across_two_processes_each_reading_its_half(tmp_path,
                                                                         monkeypatch, capfd):
    """An AWQ 4-bit checkpoint (zero points, group 32) at TP 2, one device on each process:
    the greedy output of one process (and transformers' on the dequantized weights), each
    process reading (quantization/sliced.QuantSlices, counted and logged) half of every
    split tensor: packed words, zero points and scales of its rows (q, k, v, gate, up) or
    groups (o, down); the norms whole. Every byte is read by one process, the norms by
    both."""
    from tests.quantization import checkpoints as ck
    from xla_inference.loading.safetensors import read_safetensors

    awq = ck.save_awq(tmp_path / "awq", base=ck.save_base_model(tmp_path / "base"),
                      group_size=32)
    stored = read_safetensors(awq.path / "model.safetensors")
    total = sum(t.nbytes for t in stored.values())
    vectors = sum(t.nbytes for t in stored.values() if t.ndim == 1)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (7, 26, 40)]
    expected = hf_greedy_ids(ck.save_dequantized(awq, tmp_path / "ref"), prompts, NUM_NEW)

    def greedy(**args):
        llm = start_llm(awq.path, max_num_seqs=4, max_num_batched_tokens=16, **args)
        try:
            return generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW,
                                ignore_eos=True), llm.collective_rpc("mesh_processes")[0]
        finally:
            shutdown(llm)

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    one, _ = greedy()
    assert one == expected
    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "2")
    monkeypatch.setenv("XLA_INFERENCE_JOIN_TIMEOUT", "300")
    capfd.readouterr()
    two, processes = greedy(tensor_parallel_size=2)
    assert processes == [0, 1]
    assert two == one
    out = capfd.readouterr()
    reads = {k: int(v) for k, v in re.findall(
        r"process (\d) read (\d+) bytes of checkpoint tensors", out.out + out.err)}
    assert set(reads) == {"0", "1"}, reads
    assert reads["0"] + reads["1"] == total + vectors, (reads, total, vectors)
    for nbytes in reads.values():
        assert abs(nbytes - (total + vectors) / 2) < 0.02 * total, (reads, total)


def test_expert_parallel_8_across_two_processes(tmp_path, two_hosts):
    """A tiny Qwen3-MoE (a dense layer, then 8 experts): attention and the dense MLP split
    8 ways, one expert per device, half of them on the other process."""
    model_dir = save_tiny_family(tmp_path / "moe", "qwen3_moe")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (7, 26, 40)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = start_llm(model_dir, tensor_parallel_size=8, enable_expert_parallel=True,
                    max_num_seqs=4, max_num_batched_tokens=16)
    try:
        assert llm.collective_rpc("mesh_shape")[0] == {"data": 1, "model": 8}
        compiled = num_compilations(llm)
        got = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
        assert got == expected
        assert num_compilations(llm) == compiled
    finally:
        shutdown(llm)


def test_server_across_two_processes_answers_then_exits_when_the_follower_dies(tmp_path):
    """`xla-inference serve --data-parallel-size 2 --tensor-parallel-size 4` over two
    processes (one replica each): greedy completions of two prompts in one request, one per
    replica, equal to transformers', then the follower killed mid-request: the request gets
    an error and the server exits within 60 s."""
    import http.client
    import json
    import os
    import subprocess
    import sys
    import urllib.request

    from tests.e2e.servers import free_port, stop_server, wait_healthy

    model_dir = _tiny_llama(tmp_path / "llama")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (7, 19)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    port, log_path = free_port(), tmp_path / "server.log"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "XLA_INFERENCE_HOSTS": "2", "XLA_INFERENCE_JOIN_TIMEOUT": "300"}
    cmd = [sys.executable, "-m", "xla_inference.cli", "serve", str(model_dir), "--host",
           "127.0.0.1", "--port", str(port), "--data-parallel-size", "2",
           "--tensor-parallel-size", "4", "--dtype", "float32", "--max-model-len", "128",
           "--max-num-seqs", "4", "--max-num-batched-tokens", "16",
           "--kv-cache-memory-bytes", str(4 << 20)]
    url = f"http://127.0.0.1:{port}"

    def request(max_tokens: int, stream: bool, prompt=prompts[0]) -> urllib.request.Request:
        body = json.dumps(dict(model=str(model_dir), prompt=prompt, max_tokens=max_tokens,
                               temperature=0.0, ignore_eos=True, return_token_ids=True,
                               stream=stream))
        return urllib.request.Request(url + "/v1/completions", body.encode(),
                                      {"Content-Type": "application/json"})

    def stream_killing_follower_after_first_chunk(follower, events: list[str]) -> None:
        """The follower dies while the request is certainly in flight (a timer raced a fast
        machine that had finished the whole generation first)."""
        with urllib.request.urlopen(request(110, stream=True), timeout=120) as r:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data:"):
                    continue
                events.append(line[5:].strip())
                if len(events) == 1:
                    follower.kill()
                    killed_at.append(time.monotonic())

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_healthy(proc, url, log_path, timeout_s=400)
        # Both prompts are added at once: the least loaded replica takes each, so one each.
        with urllib.request.urlopen(request(NUM_NEW, stream=False, prompt=prompts),
                                    timeout=120) as r:
            choices = sorted(json.load(r)["choices"], key=lambda c: c["index"])
        assert [c["token_ids"] for c in choices] == expected
        follower = [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if FOLLOWER in " ".join(p.cmdline())]
        assert len(follower) == 1
        killed_at, events = [], []
        try:
            stream_killing_follower_after_first_chunk(follower[0], events)
        except (OSError, http.client.HTTPException) as e:  # the connection cut: an error too
            events.append(f"error: {e!r}")
        assert killed_at and any("error" in e for e in events[1:]), events[-3:]
        assert "[DONE]" not in events[:-1]
        proc.wait(timeout=60)
        assert time.monotonic() - killed_at[0] < 60
    finally:
        if proc.poll() is None:
            stop_server(proc)
    assert "follower process 1" in log_path.read_text()
