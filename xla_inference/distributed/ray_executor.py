"""Multi-host SPMD launched on a Ray cluster: `--distributed-executor-backend ray` (or this
executor's qualname) with XLA_INFERENCE_HOSTS=N, from a node of a running cluster.

The engine is distributed/multihost.py's: vLLM's engine core is JAX process 0 (the driver) and
sends each worker call to the followers over its control channel. Only the launch differs:
instead of spawning followers on this machine or awaiting ones an operator started, this
executor joins the cluster (RAY_ADDRESS, else the local node's), reserves one bundle per
host (distributed/ray_hosts.py: STRICT_SPREAD, bundle 0 on the driver's node) and starts one
actor in each other bundle; the actor's process runs multihost.follow, the same follower
loop as a local or external follower. A cluster with fewer nodes than hosts fails start-up
within XLA_INFERENCE_JOIN_TIMEOUT, naming its node count; a follower actor that dies while
serving fails the engine as a dead follower process does (multihost.FollowerGroup.fail).
"""

import logging
import os
import secrets

from xla_inference import envs
from xla_inference.distributed import ray_hosts
from xla_inference.distributed.multihost import (FollowerGroup, MultiHostExecutor,
                                                 _free_port_pair, _log_and_print, follow,
                                                 split_address)

logger = logging.getLogger(__name__)

EXECUTOR = "xla_inference.distributed.ray_executor.RayMultiHostExecutor"
# Last lines of a follower actor's error kept in the driver's start-up failure.
_ERROR_TAIL_CHARS = 3000


class HostActor:
    """One host's follower: a Ray actor whose own process becomes JAX process `process_id`
    (its environment, the driver's XLA/JAX/vLLM settings, is set before JAX is imported)."""

    def follow(self, control: str, process_id: int, key: bytes) -> None:
        follow(control, process_id, key)


class RayFollowerGroup(FollowerGroup):
    """The followers as Ray actors, one per bundle 1..N-1 of the placement group; a
    follower's liveness is its `follow` call's ObjectRef (ready = the actor stopped)."""

    def __init__(self, num_hosts: int, control: tuple[str, int], key: bytes, placement):
        super().__init__(num_hosts, control, key)
        import ray
        from ray.util import placement_group_table

        self.placement = placement
        self.nodes = placement_group_table(placement)["bundles_to_node_id"]
        self.actors: dict = {}
        self.runs: dict = {}  # process id -> ObjectRef of its follow call
        self._ray = ray

    def start_actors(self, control: str, bundle: dict[str, float]) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_class = self._ray.remote(HostActor)
        env = ray_hosts.forwarded_env(os.environ)
        for pid in range(1, self.num_hosts):
            strategy = PlacementGroupSchedulingStrategy(self.placement,
                                                        placement_group_bundle_index=pid)
            actor = actor_class.options(**ray_hosts.actor_resources(bundle),
                                        runtime_env={"env_vars": env},
                                        scheduling_strategy=strategy).remote()
            self.actors[pid] = actor
            self.runs[pid] = actor.follow.remote(control, pid, self.key)

    def _finished(self) -> dict[int, object]:
        refs = list(self.runs.values())
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        return {pid: ref for pid, ref in self.runs.items() if ref in ready}

    def _check_unjoined(self) -> None:
        for pid, ref in self._finished().items():
            if pid in self.connections:
                continue
            try:
                self._ray.get(ref)
                error = "it returned"
            except Exception as exc:  # the actor's error, traceback included
                error = str(exc)[-_ERROR_TAIL_CHARS:]
            raise RuntimeError(f"xla-inference on Ray: follower process {pid}"
                               f"{self._describe(pid)} stopped before joining the driver: {error}")

    def _describe(self, pid: int) -> str:
        node = self.nodes.get(pid)
        return f" (Ray actor on node {node})" if node else ""

    def _where(self, pids) -> str:
        return "; ".join(f"process {p}:{self._describe(p)}" for p in pids) + (
            ": their actors' logs are under /tmp/ray/session_latest/logs on those nodes")

    def _kill_followers(self) -> None:
        for actor in self.actors.values():
            self._ray.kill(actor, no_restart=True)

    def dead(self) -> list[int]:
        return sorted(self._finished())

    def stop(self, timeout_s: float = 30.0) -> None:
        """Wait for the followers (told to stop) to return, then end their actors and free
        the hosts' bundles."""
        from ray.util.placement_group import remove_placement_group

        refs = list(self.runs.values())
        self._ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        self._kill_followers()
        remove_placement_group(self.placement)
        for conn in self.connections.values():
            conn.close()


def _join_cluster():
    """Connect this process (vLLM's engine core) to the running Ray cluster; True when it
    connected here (and so disconnects at shutdown)."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError as exc:
        raise RuntimeError(f"xla-inference on Ray: no Ray cluster at {address!r} to join: start "
                           "one (`ray start --head` here, `ray start --address HEAD:6379` on the "
                           f"other hosts) or set RAY_ADDRESS ({exc})") from None
    return True


class RayMultiHostExecutor(MultiHostExecutor):
    """MultiHostExecutor whose followers are Ray actors, one per node of the cluster."""

    uses_ray = True

    def _launch_followers(self, num_hosts: int) -> tuple[FollowerGroup, str]:
        import ray

        self._ray_joined_here = _join_cluster()
        node_ip = ray.util.get_node_ip_address()
        address = envs.coordinator() or f"{node_ip}:{_free_port_pair(node_ip)}"
        host, port = split_address(address)
        os.environ.update(XLA_INFERENCE_COORDINATOR=address, XLA_INFERENCE_PROCESS_ID="0")
        bundle = envs.ray_bundle()
        placement = ray_hosts.place_hosts(num_hosts, bundle, envs.join_timeout())
        key = (envs.multihost_key() or secrets.token_hex(16)).encode()
        followers = RayFollowerGroup(num_hosts, (host, port + 1), key, placement)
        followers.start_actors(f"{host}:{port + 1}", bundle)
        _log_and_print("xla-inference on Ray: driver of %d JAX processes on node %s, coordinator "
                       "%s; followers: %s", num_hosts, followers.nodes.get(0), address,
                       ", ".join(f"process {p} on node {followers.nodes.get(p)}"
                                 for p in range(1, num_hosts)))
        return followers, address

    def shutdown(self) -> None:
        super().shutdown()
        if getattr(self, "_ray_joined_here", False):
            import ray

            self._ray_joined_here = False
            ray.shutdown()
