"""Pipeline parallel 2 x data parallel 2 across two JAX processes ("hosts"), two virtual
CPU devices each (distributed/multihost.py): the stage axis spans the processes
(parallel/pipeline.stage_devices), so each process holds one stage of both replicas (its
layer's weights, both replicas' KV pages of that layer), and each replica's micro-batches
cross from one process to the other every step. Greedy output equals transformers', both
replicas ran requests, and nothing compiles after warm-up."""

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, num_compilations, shutdown, start_llm
from tests.helpers import hf_greedy_ids, save_tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 10


def test_pipeline_2_x_data_parallel_2_across_two_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "2")
    monkeypatch.setenv("XLA_INFERENCE_JOIN_TIMEOUT", "300")
    model_dir = save_tiny_llama(tmp_path / "llama")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (7, 26, 40, 12)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = start_llm(model_dir, pipeline_parallel_size=2, max_num_seqs=4,
                    max_num_batched_tokens=32, additional_config={"data_parallel_size": 2})
    try:
        assert llm.collective_rpc("mesh_shape")[0] == {"stage": 2, "data": 2, "model": 1}
        assert llm.collective_rpc("mesh_processes")[0] == [0, 0, 1, 1]
        compiled = num_compilations(llm)
        got = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
        assert num_compilations(llm) == compiled
        rows = llm.collective_rpc("replica_rows")[0]
    finally:
        shutdown(llm)
    assert got == expected
    assert len(rows) == 2 and min(rows) > 0, rows
