"""Which KV connectors this platform serves, checked at start-up (plugin/platform.py) in
the front-end too: imports neither JAX nor the connectors themselves."""

from __future__ import annotations

CONNECTOR_NAME = "XlaSharedStorageConnector"
MODULE_PATH = "xla_inference.kv_transfer.shared_storage"
NETWORK_CONNECTOR = "XlaNetworkConnector"
# name -> module; the class has the connector's name.
CONNECTOR_MODULES = {CONNECTOR_NAME: MODULE_PATH,
                     NETWORK_CONNECTOR: "xla_inference.kv_transfer.network"}
# vLLM's own offload connector (--kv-offloading-size): its scheduler side unchanged, our
# worker side (kv_transfer/offload.py).
OFFLOADING_CONNECTOR = "OffloadingConnector"
SERVED_CONNECTORS = (*CONNECTOR_MODULES, OFFLOADING_CONNECTOR)
# kv_connector_extra_config of OffloadingConnector: what vLLM's scheduler side and CPU
# manager read (all served as vLLM serves them), and ours: a directory whose file backs the
# host tier (offload.py).
OFFLOAD_DISK_PATH = "disk_path"
OFFLOAD_SETTINGS = ("cpu_bytes_to_use", "block_size", "blocks_per_chunk", "eviction_policy",
                    "cache_policy_module_path", "store_threshold", "max_tracker_size",
                    "offload_prompt_only", "self_describing_kv_events", "spec_name",
                    "canonical_layout", OFFLOAD_DISK_PATH)


_SIZED_TIERS: set[int] = set()  # ids of the kv_transfer_configs already scaled here


def size_offload_tier_for_one_process(vllm_config) -> None:
    """vLLM's offload spec (vllm/v1/kv_offload/cpu/spec.py) sizes a host chunk as
    world_size x one worker's page bytes, each of vLLM's workers holding 1/world_size of the
    heads; here one process holds every rank's page whole, so the spec would count each page
    world_size times and the tier would hold 1/world_size of cpu_bytes_to_use. Scaling
    cpu_bytes_to_use by world_size, once, in the engine core's config before its scheduler
    and its worker build their connector sides, gives both the tier that was asked for."""
    transfer = vllm_config.kv_transfer_config
    world_size = vllm_config.parallel_config.world_size
    if (transfer is None or transfer.kv_connector != OFFLOADING_CONNECTOR or world_size <= 1
            or id(transfer) in _SIZED_TIERS):
        return
    extra = transfer.kv_connector_extra_config
    if "cpu_bytes_to_use" in extra:
        extra["cpu_bytes_to_use"] = int(float(extra["cpu_bytes_to_use"])) * world_size
        _SIZED_TIERS.add(id(transfer))


def register_connectors() -> None:
    """Make our connectors known to vLLM's factory by name (idempotent), in every process
    that builds or checks a config (vLLM resolves the class while checking it)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    for name, module in CONNECTOR_MODULES.items():
        if name not in KVConnectorFactory._registry:
            KVConnectorFactory.register_connector(name, module, name)


def refuse_unserved(kv_transfer_config) -> None:
    """Refuse at start-up a --kv-transfer-config naming a connector not served here."""
    name = kv_transfer_config.kv_connector
    if name is None:
        return
    if name not in SERVED_CONNECTORS:
        raise ValueError(f"xla-inference does not support KV connector {name!r} "
                         f"(--kv-transfer-config); it serves {', '.join(SERVED_CONNECTORS)}")
    path = kv_transfer_config.kv_connector_module_path
    if name == OFFLOADING_CONNECTOR:
        if path is not None:
            raise ValueError(f"xla-inference serves vLLM's own {name}, not one from "
                             f"kv_connector_module_path {path!r} (--kv-transfer-config)")
        refuse_unserved_offload_settings(kv_transfer_config.kv_connector_extra_config or {})
        return
    if path not in (None, CONNECTOR_MODULES[name]):
        raise ValueError(f"xla-inference does not support KV connector {name!r} from module "
                         f"{path!r} (--kv-transfer-config); its {name} comes from "
                         f"{CONNECTOR_MODULES[name]}, with or without kv_connector_module_path")


def refuse_unserved_offload_settings(extra: dict) -> None:
    """OffloadingConnector's kv_connector_extra_config: a host tier of cpu_bytes_to_use bytes
    (vLLM's CPU manager); refused, naming the setting: no size, vLLM's other tiers
    (spec_name), the canonical page layout, and settings vLLM does not read."""
    where = "(--kv-transfer-config kv_connector_extra_config of OffloadingConnector)"
    unknown = sorted(set(extra) - set(OFFLOAD_SETTINGS))
    if unknown:
        raise ValueError(f"xla-inference does not support {', '.join(map(repr, unknown))} "
                         f"{where}; it reads {', '.join(OFFLOAD_SETTINGS)}")
    size = extra.get("cpu_bytes_to_use")
    if not _positive_number(size):
        raise ValueError(f"KV offload needs cpu_bytes_to_use, a positive number of bytes "
                         f"{where} (or --kv-offloading-size in GiB); got {size!r}")
    spec = extra.get("spec_name", "CPUOffloadingSpec")
    if spec != "CPUOffloadingSpec":
        raise ValueError(f"xla-inference does not support spec_name {spec!r} {where}; it "
                         f"offloads to host memory (CPUOffloadingSpec), optionally backed by "
                         f"a file in {OFFLOAD_DISK_PATH}")
    if extra.get("canonical_layout"):
        raise ValueError(f"xla-inference does not support canonical_layout {where}: the host "
                         f"tier keeps this engine's page layout")


def _positive_number(value) -> bool:
    """vLLM reads cpu_bytes_to_use with int(): a number, or a string of one."""
    if isinstance(value, bool):
        return False
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


def refuse_unserved_offloading_size(cache_config, use_simple_offload: bool) -> None:
    """--kv-offloading-size becomes vLLM's OffloadingConnector (after the platform's checks
    have run): refuse the backends that would become another connector."""
    if cache_config is None or cache_config.kv_offloading_size is None:
        return
    if cache_config.kv_offloading_backend != "native":
        raise ValueError(f"xla-inference does not support --kv-offloading-backend "
                         f"{cache_config.kv_offloading_backend}; it serves native")
    if use_simple_offload:
        raise ValueError("xla-inference does not support VLLM_USE_SIMPLE_KV_OFFLOAD=1 "
                         "(SimpleCPUOffloadConnector) with --kv-offloading-size; unset it")
