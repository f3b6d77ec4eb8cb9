"""vllm.LLM launched on a local Ray cluster (`--distributed-executor-backend ray`,
plugin/ray_executor.py): two Ray nodes on this machine, one JAX process of 4 virtual CPU
devices each, tensor parallel 8 over both gives transformers' greedy output; a one-node
cluster asked for two hosts fails start-up within the join timeout, naming its node count."""

import contextlib
import time

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, num_compilations, shutdown, start_llm
from tests.e2e.test_llm_multihost import _tiny_llama
from tests.helpers import hf_greedy_ids

pytestmark = pytest.mark.slow

NUM_NEW = 10
JOIN_TIMEOUT_S = 4


@contextlib.contextmanager
def ray_cluster(num_nodes: int, monkeypatch):
    """A Ray cluster of `num_nodes` nodes on this machine (one CPU each, no dashboard, a
    small object store), its address in RAY_ADDRESS for the engine core; always shut down."""
    from ray.cluster_utils import Cluster

    node = dict(num_cpus=1, object_store_memory=80 << 20)
    cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, **node))
    try:
        for _ in range(num_nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture
def two_hosts(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "2")


def test_tensor_parallel_8_over_two_ray_nodes(tmp_path, two_hosts, monkeypatch):
    monkeypatch.setenv("XLA_INFERENCE_JOIN_TIMEOUT", "300")
    model_dir = _tiny_llama(tmp_path / "llama")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (7, 26, 40)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    with ray_cluster(2, monkeypatch):
        llm = start_llm(model_dir, tensor_parallel_size=8, max_num_seqs=4,
                        max_num_batched_tokens=16, distributed_executor_backend="ray")
        try:
            executor = llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
            assert executor == "xla_inference.plugin.ray_executor.RayMultiHostExecutor"
            assert llm.collective_rpc("mesh_shape")[0] == {"data": 1, "model": 8}
            compiled = num_compilations(llm)
            got = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW,
                               ignore_eos=True)
            assert num_compilations(llm) == compiled
        finally:
            shutdown(llm)
    assert got == expected


def test_one_node_cluster_asked_for_two_hosts_fails_naming_its_node_count(
        tmp_path, two_hosts, monkeypatch, capfd):
    monkeypatch.setenv("XLA_INFERENCE_JOIN_TIMEOUT", str(JOIN_TIMEOUT_S))
    model_dir = _tiny_llama(tmp_path / "llama")
    with ray_cluster(1, monkeypatch):
        start = time.monotonic()
        with pytest.raises(Exception):
            start_llm(model_dir, tensor_parallel_size=8, distributed_executor_backend="ray")
        # vLLM's engine start-up (imports, config) plus the bounded wait, never a hang.
        assert time.monotonic() - start < 120
    err = capfd.readouterr().err
    assert "the mesh needs 2 hosts" in err and "the cluster has 1 alive node " in err, err[-3000:]
    assert f"no placement within {JOIN_TIMEOUT_S}s" in err
