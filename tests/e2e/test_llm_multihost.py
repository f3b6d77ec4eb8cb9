"""vllm.LLM across two JAX processes ("hosts"), 4 virtual CPU devices each, joined by
jax.distributed (plugin/multihost.py): tensor parallel 8 over both gives transformers'
greedy output, and killing the follower mid-request ends the engine with an error naming
it, well within 60 s."""

import threading
import time

import numpy as np
import psutil
import pytest

from tests.e2e.engines import generate_ids, num_compilations, shutdown, start_llm
from tests.helpers import hf_greedy_ids, save_tiny_model

pytestmark = pytest.mark.slow

NUM_NEW = 10
FOLLOWER = "xla_inference.plugin.multihost"


def _tiny_llama(path):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, head_dim=32, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    return save_tiny_model(path, config, seed=0)


def _followers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if FOLLOWER in " ".join(p.cmdline())]


@pytest.fixture
def two_hosts(monkeypatch):
    """Each process of the engine (the driver in vLLM's engine core, the follower it
    spawns) sees 4 devices of its own."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "2")
    monkeypatch.setenv("XLA_INFERENCE_JOIN_TIMEOUT", "300")


def test_tensor_parallel_8_across_two_processes_then_a_killed_follower_ends_it(
        tmp_path, two_hosts, capfd):
    model_dir = _tiny_llama(tmp_path / "llama")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (7, 26, 40)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = start_llm(model_dir, tensor_parallel_size=8, max_num_seqs=4, max_num_batched_tokens=16)
    try:
        assert llm.collective_rpc("mesh_shape")[0] == {"data": 1, "model": 8}
        compiled = num_compilations(llm)
        got = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
        assert got == expected
        assert num_compilations(llm) == compiled
        followers = _followers()
        assert len(followers) == 1

        # Mid-request: a long generation is running when the follower is killed.
        killed_at = []
        threading.Timer(3.0, lambda: (followers[0].kill(), killed_at.append(time.monotonic()))
                        ).start()
        with pytest.raises(Exception) as raised:
            generate_ids(llm, prompts * 2, temperature=0.0, max_tokens=110, ignore_eos=True)
        assert killed_at, f"the generation ended before the kill: {raised.value!r}"
        assert time.monotonic() - killed_at[0] < 60
    finally:
        shutdown(llm)
    assert "EngineDead" in type(raised.value).__name__ or "dead" in str(raised.value).lower()
    err = capfd.readouterr().err
    assert "follower process 1" in err and "closed its connection" in err, err[-3000:]
    assert not _followers()
