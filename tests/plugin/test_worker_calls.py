"""The worker's answer to update_max_model_len, on a worker built from a VllmConfig (no model
loaded). vLLM 0.32 calls it only before the engine is built (tests/e2e/test_llm_tiny.py
drives that through `--max-model-len -1`); these cover what the e2e run cannot reach."""

import json
import types

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # imports vLLM's config and worker base


@pytest.fixture
def worker(tmp_path):
    from vllm.config import ModelConfig, VllmConfig

    from xla_inference.plugin.worker import XlaWorker

    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=512, torch_dtype="float32")))
    config = VllmConfig(model_config=ModelConfig(model=str(tmp_path), skip_tokenizer_init=True,
                                                 max_model_len=512, dtype="float32"))
    return XlaWorker(config, local_rank=0, rank=0, distributed_init_method="tcp://127.0.0.1:0")


def _built_for(worker, max_model_len: int):
    """Stand in for an engine initialize_from_config built for `max_model_len` tokens."""
    from xla_inference.runner.engine import EngineConfig

    cfg = EngineConfig(num_blocks=8, block_size=16, max_num_tokens=64, max_num_seqs=4,
                       max_model_len=max_model_len)
    worker.model_runner = types.SimpleNamespace(engine=types.SimpleNamespace(cfg=cfg))


def test_before_the_engine_is_built_the_config_takes_the_new_length(worker):
    assert worker.served_max_model_len() is None
    worker.update_max_model_len(96)
    assert worker.model_config.max_model_len == 96


def test_a_built_engine_serves_a_shorter_length_but_refuses_a_longer_one(worker):
    _built_for(worker, 96)
    worker.update_max_model_len(64)
    assert worker.model_config.max_model_len == 64
    with pytest.raises(ValueError, match="compiled for at most 96 tokens"):
        worker.update_max_model_len(97)
    assert worker.model_config.max_model_len == 64


def test_a_length_below_one_is_refused(worker):
    with pytest.raises(ValueError, match="at least 1"):
        worker.update_max_model_len(0)
