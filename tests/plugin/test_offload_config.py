"""KV cache offload's start-up checks through vLLM's own EngineArgs -> VllmConfig path:
vLLM's two spellings (--kv-offloading-size, --kv-transfer-config with OffloadingConnector)
accepted; what the host tier does not serve refused naming the setting. (The settings one
by one: tests/kv_transfer/test_host_tier.py; served: tests/e2e/test_llm_kv_offload.py.)"""

import pytest

from tests.helpers import save_tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # builds vLLM configs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("offload") / "llama")


def _config(model_dir, **args):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model_dir), max_model_len=128, **args).create_engine_config()


def _offload(**extra):
    return dict(kv_connector="OffloadingConnector", kv_role="kv_both",
                kv_connector_extra_config=extra)


def test_both_spellings_are_accepted(model_dir):
    config = _config(model_dir, kv_offloading_size=0.5).kv_transfer_config
    assert config.kv_connector == "OffloadingConnector"
    assert config.kv_connector_extra_config == {"cpu_bytes_to_use": 0.5 * (1 << 30)}
    config = _config(model_dir, kv_transfer_config=_offload(cpu_bytes_to_use=1 << 20))
    assert config.kv_transfer_config.kv_connector == "OffloadingConnector"


def test_data_parallel_replicas_split_the_tier_and_take_a_port_each(model_dir):
    """Each replica's connector (kv_transfer/replicas.py) is built from its own config: its
    share of the offload tier's bytes; a network connector's replica r listens on kv_port + r."""
    from xla_inference.kv_transfer.replicas import replica_vllm_config

    config = _config(model_dir, kv_offloading_size=0.5, additional_config={"data_parallel_size": 2})
    replicas = [replica_vllm_config(config, r, 2) for r in range(2)]
    assert [c.kv_transfer_config.kv_connector_extra_config["cpu_bytes_to_use"]
            for c in replicas] == [1 << 28] * 2
    assert config.kv_transfer_config.kv_connector_extra_config == {"cpu_bytes_to_use": 0.5 * (1 << 30)}
    assert replicas[1].model_config is config.model_config
    network = _config(model_dir, additional_config={"data_parallel_size": 2}, kv_transfer_config=dict(
        kv_connector="XlaNetworkConnector", kv_role="kv_both", kv_port=23000))
    assert [replica_vllm_config(network, r, 2).kv_transfer_config.kv_port
            for r in range(2)] == [23000, 23001]
    assert replica_vllm_config(network, 0, 1) is network


@pytest.mark.parametrize("args, flag", [
    (dict(kv_transfer_config=_offload(num_cpu_blocks=64)), "'num_cpu_blocks'"),
    (dict(kv_transfer_config=_offload(cpu_bytes_to_use=1, spec_name="TieringOffloadingSpec")),
     "spec_name 'TieringOffloadingSpec'"),
    (dict(kv_offloading_size=1.0, kv_offloading_backend="lmcache"),
     "--kv-offloading-backend lmcache"),
])
def test_unserved_offload_settings_are_refused_by_name(model_dir, args, flag):
    with pytest.raises(Exception, match="xla-inference does not support") as info:
        _config(model_dir, **args)
    assert flag in str(info.value)


def test_connectors_with_a_drafter_of_its_own_are_refused(model_dir):
    """n-gram drafts need only the tokens; a draft model's KV (or EAGLE's hidden states) of
    the tokens a connector loads is never computed."""
    config = _config(model_dir, kv_offloading_size=0.5,
                     speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                         "prompt_lookup_max": 2})
    assert config.speculative_config.method == "ngram"
    with pytest.raises(Exception, match="speculative decoding method 'draft_model': its "
                                        "drafter's KV or hidden states"):
        _config(model_dir, kv_offloading_size=0.5,
                speculative_config={"method": "draft_model", "model": str(model_dir),
                                    "num_speculative_tokens": 2})
