"""kv_transfer/config.size_offload_tier_for_one_process: vLLM's offload spec counts a page
world_size times (one per worker); our one process holds it whole, so cpu_bytes_to_use is
scaled by world_size, once, and only for the offload connector."""

from types import SimpleNamespace

from xla_inference.kv_transfer.config import size_offload_tier_for_one_process


def _config(connector, world_size, size=1000):
    transfer = SimpleNamespace(kv_connector=connector,
                               kv_connector_extra_config={"cpu_bytes_to_use": size})
    return SimpleNamespace(kv_transfer_config=transfer,
                           parallel_config=SimpleNamespace(world_size=world_size))


def _bytes(config):
    return config.kv_transfer_config.kv_connector_extra_config["cpu_bytes_to_use"]


def test_the_tier_is_scaled_by_the_world_size_once():
    config = _config("OffloadingConnector", 4, "1000")  # vLLM reads it with int()
    size_offload_tier_for_one_process(config)
    size_offload_tier_for_one_process(config)  # the engine core builds more than once
    assert _bytes(config) == 4000


def test_one_rank_and_other_connectors_are_left_alone():
    one = _config("OffloadingConnector", 1)
    network = _config("XlaNetworkConnector", 2)
    for config in (one, network):
        size_offload_tier_for_one_process(config)
    assert _bytes(one) == 1000 and _bytes(network) == 1000
    size_offload_tier_for_one_process(SimpleNamespace(
        kv_transfer_config=None, parallel_config=SimpleNamespace(world_size=2)))
