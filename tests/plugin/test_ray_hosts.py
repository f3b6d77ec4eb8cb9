"""How a multi-host engine is laid out on a Ray cluster (distributed/ray_hosts.py), without a
cluster: the bundles and their pins, the actor's resources, the environment a follower
inherits, and the message naming the node count when the cluster is too small. The engine
on a real (local) Ray cluster is tests/e2e/test_llm_ray.py."""

import pytest

from xla_inference import envs
from xla_inference.distributed import ray_hosts


def test_one_bundle_per_host_the_first_pinned_to_the_drivers_node():
    bundles, selectors = ray_hosts.host_bundles(3, {"TPU": 4.0, "CPU": 1.0}, "node-a")
    assert bundles == [{"TPU": 4.0, "CPU": 1.0}] * 3
    assert selectors == [{"ray.io/node-id": "node-a"}, {}, {}]
    bundles[0]["TPU"] = 8.0  # each bundle its own dict
    assert bundles[1]["TPU"] == 4.0


def test_the_actor_takes_its_whole_bundle():
    assert ray_hosts.actor_resources({"CPU": 1.0}) == dict(num_cpus=1.0, num_gpus=0,
                                                           resources={})
    assert ray_hosts.actor_resources({"GPU": 8.0, "memory": 1e9, "TPU": 4.0, "CPU": 2.0}) == \
        dict(num_cpus=2.0, num_gpus=8.0, memory=1e9, resources={"TPU": 4.0})


def test_a_follower_inherits_the_drivers_xla_jax_and_vllm_settings_only():
    environ = {"XLA_FLAGS": "--x", "JAX_PLATFORMS": "cpu", "XLA_INFERENCE_HOSTS": "2",
               "VLLM_LOGGING_LEVEL": "INFO", "HF_HOME": "/h", "PATH": "/bin",
               "CUDA_VISIBLE_DEVICES": "0", "PYTHONPATH": "/src",
               "XLA_INFERENCE_PROCESS_ID": "0", "XLA_INFERENCE_COORDINATOR": "10.0.0.1:7",
               "XLA_INFERENCE_MULTIHOST_KEY": "secret"}
    assert ray_hosts.forwarded_env(environ) == {
        "XLA_FLAGS": "--x", "JAX_PLATFORMS": "cpu", "XLA_INFERENCE_HOSTS": "2",
        "VLLM_LOGGING_LEVEL": "INFO", "HF_HOME": "/h"}


def test_too_few_nodes_names_the_count_and_what_fits():
    nodes = [dict(Alive=True, Resources={"CPU": 8.0, "TPU": 4.0}),
             dict(Alive=True, Resources={"CPU": 8.0}),
             dict(Alive=False, Resources={"CPU": 8.0, "TPU": 4.0})]
    message = ray_hosts.too_few_nodes_message(4, {"TPU": 4.0}, nodes, waited_s=30.2)
    assert "the mesh needs 4 hosts (XLA_INFERENCE_HOSTS=4)" in message
    assert "the cluster has 2 alive nodes (1 with the resources of one bundle" in message
    assert "no placement within 30s" in message
    one = ray_hosts.too_few_nodes_message(2, {"CPU": 1.0}, nodes[:1], waited_s=5)
    assert "has 1 alive node (1 with" in one


def test_the_bundle_setting(monkeypatch):
    monkeypatch.delenv("XLA_INFERENCE_RAY_BUNDLE", raising=False)
    assert envs.ray_bundle() == {"CPU": 1.0}
    monkeypatch.setenv("XLA_INFERENCE_RAY_BUNDLE", '{"GPU": 8, "CPU": 4}')
    assert envs.ray_bundle() == {"GPU": 8.0, "CPU": 4.0}
    for bad in ("GPU=8", "{}", '{"GPU": 0}', '["GPU"]'):
        monkeypatch.setenv("XLA_INFERENCE_RAY_BUNDLE", bad)
        with pytest.raises(ValueError, match="XLA_INFERENCE_RAY_BUNDLE must be a JSON object"):
            envs.ray_bundle()
