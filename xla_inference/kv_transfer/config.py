"""Which KV connectors this platform serves, checked at start-up (plugin/platform.py) in
the front-end too: imports neither JAX nor the connectors themselves."""

from __future__ import annotations

CONNECTOR_NAME = "XlaSharedStorageConnector"
MODULE_PATH = "xla_inference.kv_transfer.shared_storage"
NETWORK_CONNECTOR = "XlaNetworkConnector"
# name -> module; the class has the connector's name.
CONNECTOR_MODULES = {CONNECTOR_NAME: MODULE_PATH,
                     NETWORK_CONNECTOR: "xla_inference.kv_transfer.network"}
SERVED_CONNECTORS = tuple(CONNECTOR_MODULES)


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
    if path not in (None, CONNECTOR_MODULES[name]):
        raise ValueError(f"xla-inference does not support KV connector {name!r} from module "
                         f"{path!r} (--kv-transfer-config); its {name} comes from "
                         f"{CONNECTOR_MODULES[name]}, with or without kv_connector_module_path")
