"""Where a multi-host engine's JAX processes go on a Ray cluster: one placement-group bundle
per host, STRICT_SPREAD (no two on one node), the first pinned to the driver's node (vLLM's
engine core runs process 0 there), so processes 1..N-1 land on N-1 other nodes.

No vLLM here (the executor is distributed/ray_executor.py): these rules are tested without an
engine. Ray itself is imported only by the functions that talk to a cluster.
"""

import logging
import time

logger = logging.getLogger(__name__)

# Ray gives every node this label, its node id: how bundle 0 is pinned to the driver's node
# (node:<ip> resources cannot tell apart two nodes that share an address).
NODE_ID_LABEL = "ray.io/node-id"
# What a follower inherits from the driver's environment: the same JAX/XLA flags, the same
# xla-inference and vLLM settings, the same Hugging Face cache and tokens. Host-specific
# variables (paths, visible devices, PYTHONPATH) stay as each node's Ray started them.
FORWARDED_PREFIXES = ("XLA_", "JAX_", "LIBTPU_", "VLLM_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_",
                      "TOKENIZERS_")
# Set per process by the follower itself, or (the key) handed to it as an argument rather
# than written into the actors' runtime environment, which Ray shows to anyone watching.
NOT_FORWARDED = {"XLA_INFERENCE_PROCESS_ID", "XLA_INFERENCE_COORDINATOR",
                 "XLA_INFERENCE_MULTIHOST_KEY"}
# Ray's own names for the resources an actor asks for by keyword.
_KEYWORD_RESOURCES = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}
_POLL_S = 0.5


def host_bundles(num_hosts: int, bundle: dict[str, float], driver_node: str
                 ) -> tuple[list[dict[str, float]], list[dict[str, str]]]:
    """The placement group's bundles (one host's resources each) and their label selectors:
    bundle 0 on the driver's node, the others anywhere (STRICT_SPREAD keeps them apart)."""
    selectors = [{NODE_ID_LABEL: driver_node}] + [{} for _ in range(num_hosts - 1)]
    return [dict(bundle) for _ in range(num_hosts)], selectors


def actor_resources(bundle: dict[str, float]) -> dict:
    """Ray actor options that take one whole bundle: CPU, GPU and memory by keyword, the
    rest (TPU, custom resources) in `resources`. Taking the accelerators is what makes Ray
    show the actor's process its host's devices."""
    options = {keyword: bundle.get(name, 0) for name, keyword in _KEYWORD_RESOURCES.items()}
    if not options["memory"]:
        del options["memory"]
    options["resources"] = {k: v for k, v in bundle.items() if k not in _KEYWORD_RESOURCES}
    return options


def forwarded_env(environ) -> dict[str, str]:
    return {k: v for k, v in environ.items()
            if k.startswith(FORWARDED_PREFIXES) and k not in NOT_FORWARDED}


def nodes_that_fit(nodes: list[dict], bundle: dict[str, float]) -> int:
    """How many alive nodes (ray.nodes() entries) have a bundle's resources in all."""
    return sum(1 for n in nodes if n.get("Alive")
               and all(n.get("Resources", {}).get(k, 0) >= v for k, v in bundle.items()))


def too_few_nodes_message(num_hosts: int, bundle: dict[str, float], nodes: list[dict],
                          waited_s: float) -> str:
    alive = sum(1 for n in nodes if n.get("Alive"))
    fit = nodes_that_fit(nodes, bundle)
    return (f"xla-inference on Ray: the mesh needs {num_hosts} hosts (XLA_INFERENCE_HOSTS="
            f"{num_hosts}), one Ray node each, the driver's included, but the cluster has "
            f"{alive} alive node{'s' if alive != 1 else ''} ({fit} with the resources of one "
            f"bundle, {bundle}: "
            f"XLA_INFERENCE_RAY_BUNDLE); no placement within {waited_s:.0f}s "
            f"(XLA_INFERENCE_JOIN_TIMEOUT). Add nodes (`ray start --address HEAD:6379` on each "
            "host) or lower the host count")


def place_hosts(num_hosts: int, bundle: dict[str, float], timeout_s: float):
    """A ready placement group of one bundle per host, bundle 0 on this process's node. The
    wait is bounded: a cluster with too few nodes (or an autoscaler that adds none in
    time) fails here, naming the node count, rather than leaving start-up pending."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    driver_node = ray.get_runtime_context().get_node_id()
    bundles, selectors = host_bundles(num_hosts, bundle, driver_node)
    group = placement_group(bundles, strategy="STRICT_SPREAD", bundle_label_selector=selectors)
    logger.info("xla-inference on Ray: placing %d hosts (bundles of %s, STRICT_SPREAD) on a "
                "cluster of %d alive nodes", num_hosts, bundle,
                sum(1 for n in ray.nodes() if n["Alive"]))
    start = time.monotonic()
    while True:
        ready, _ = ray.wait([group.ready()], timeout=_POLL_S)
        if ready:
            ray.get(ready[0])
            return group
        if time.monotonic() - start > timeout_s:
            remove_placement_group(group)
            raise RuntimeError(too_few_nodes_message(num_hosts, bundle, ray.nodes(),
                                                     time.monotonic() - start))
