"""The worker's side of vLLM's hybrid KV cache, without starting an engine: the specs it
reports per layer kind, vLLM's own KV cache config built from them, the engine layout read
back from that config, and the KV memory the worker asks for."""

import copy
import json

import pytest
import torch
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.v1.core.kv_cache_utils import (get_kv_cache_configs,
                                         get_max_concurrency_for_kv_cache_config)
from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec

from xla_inference.models import gemma3
from xla_inference.models.interface import FULL, MLA, SLIDING, KvLayer
from xla_inference.plugin.worker import XlaWorker, kv_cache_spec, kv_layout

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

BLOCK = 16
MAX_MODEL_LEN = 2048
MAX_NUM_SEQS = 4
PATTERN = ["sliding_attention"] * 5 + ["full_attention"]  # Gemma 3's 5:1


@pytest.fixture(scope="module")
def gemma3_like(tmp_path_factory):
    """A VllmConfig and our config for an 18-layer Gemma 3 (config.json only), window 512."""
    model_dir = tmp_path_factory.mktemp("gemma3")
    hf = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=256,
              hidden_size=64, intermediate_size=96, num_hidden_layers=18, num_attention_heads=4,
              num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=512,
              layer_types=PATTERN * 3, max_position_embeddings=4096, rms_norm_eps=1e-6,
              torch_dtype="float32", bos_token_id=2, eos_token_id=1)
    (model_dir / "config.json").write_text(json.dumps(hf))
    vllm_config = VllmConfig(
        model_config=ModelConfig(model=str(model_dir), skip_tokenizer_init=True,
                                 max_model_len=MAX_MODEL_LEN, dtype="float32"),
        scheduler_config=SchedulerConfig(max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=64,
                                         max_model_len=MAX_MODEL_LEN, is_encoder_decoder=False,
                                         async_scheduling=False),
        cache_config=CacheConfig(block_size=BLOCK))
    # What the engine core resolves from get_supported_kv_cache_layouts, before sizing.
    vllm_config.cache_config.kv_cache_layout = "LBNHC"
    return vllm_config, gemma3.Gemma3Config.from_hf(hf)


class _Model:
    def __init__(self, layers):
        self.layers = layers

    def kv_layers(self):
        return self.layers


def _worker(vllm_config, layers) -> XlaWorker:
    """The worker's KV methods on a config and layers (nothing loaded, no device)."""
    worker = object.__new__(XlaWorker)
    worker.vllm_config, worker.cache_config = vllm_config, vllm_config.cache_config
    worker.model_config = vllm_config.model_config
    worker.model = _Model(layers)
    worker.draft_model = None  # no speculative decoding
    worker._kv_torch_dtype = lambda: torch.float32
    return worker


def _kv_cache_config(worker, memory: int):
    config = copy.deepcopy(worker.vllm_config)
    return config, get_kv_cache_configs(config, [worker.get_kv_cache_spec()], [memory])[0]


def test_each_layer_kind_has_its_own_spec():
    def spec(layer):
        return kv_cache_spec(layer, BLOCK, torch.float32)

    assert spec(KvLayer(SLIDING, 2, 32, 8)) == SlidingWindowSpec(
        block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32, sliding_window=8)
    assert type(spec(KvLayer(FULL, 2, 32))) is FullAttentionSpec
    assert type(spec(KvLayer(MLA, 1, 96))) is MLAAttentionSpec


def test_gemma3_layers_share_arrays_across_groups(gemma3_like):
    vllm_config, cfg = gemma3_like
    worker = _worker(vllm_config, gemma3.FAMILY.kv_layers(cfg))
    _, kv = _kv_cache_config(worker, 64 << 20)
    groups, arrays = kv_layout(kv, 18, BLOCK)
    # vLLM: the 3 global layers in one group, the 15 sliding ones in 5 groups of 3; layer j
    # of every group at the same bytes, so 3 sets of arrays serve 18 layers.
    assert len(kv.kv_cache_groups) == 6 and len(set(groups)) == 6
    assert len(set(arrays)) == 3
    full = {groups[i] for i, kind in enumerate(PATTERN * 3) if kind == "full_attention"}
    assert len(full) == 1
    for g in set(groups):
        members = [i for i in range(18) if groups[i] == g]
        assert sorted(arrays[i] for i in members) == [0, 1, 2]  # one layer per set
    # The engine's arrays (3 sets of K and V, every page) are exactly vLLM's memory.
    page = 2 * BLOCK * 1 * 32 * 4
    assert {t.size for t in kv.kv_cache_tensors} == {3 * page * kv.num_blocks}


def test_a_layer_without_a_cache_is_a_clear_error(gemma3_like):
    vllm_config, cfg = gemma3_like
    _, kv = _kv_cache_config(_worker(vllm_config, gemma3.FAMILY.kv_layers(cfg)), 64 << 20)
    with pytest.raises(ValueError, match="places no cache for"):
        kv_layout(kv, 19, BLOCK)
    with pytest.raises(ValueError, match="one page size"):
        kv_layout(kv, 18, 32)


@pytest.mark.parametrize("kinds", ["gemma3", "full", "sliding"])
def test_max_useful_kv_bytes_hold_max_num_seqs_requests(gemma3_like, kinds):
    """The most KV memory the worker asks for is what max_num_seqs requests of max_model_len
    take in vLLM's groups, and the null page: a global group takes max_model_len's pages,
    a sliding one its window's and one step's, one more for a window that starts
    mid-page."""
    vllm_config, cfg = gemma3_like
    layers = {"gemma3": gemma3.FAMILY.kv_layers(cfg),
              "full": [KvLayer(FULL, 1, 32)] * 18,
              "sliding": [KvLayer(SLIDING, 1, 32, 512)] * 18}[kinds]
    worker = _worker(vllm_config, layers)
    useful = worker._max_useful_kv_bytes()
    config, kv = _kv_cache_config(worker, useful)
    full = MAX_MODEL_LEN // BLOCK
    sliding = -(-(511 + vllm_config.max_in_flight_tokens) // BLOCK) + 1
    layer_page = 2 * BLOCK * 32 * 4
    # gemma3: a global group and 5 sliding ones of 3 layers; else one group of 18 layers
    pages, page_bytes = {"gemma3": (full + 5 * sliding, 3 * layer_page),
                         "full": (full, 18 * layer_page),
                         "sliding": (sliding, 18 * layer_page)}[kinds]
    assert sliding < full
    assert useful == (MAX_NUM_SEQS * pages + 1) * page_bytes
    assert kv.num_blocks == MAX_NUM_SEQS * pages + 1
    assert get_max_concurrency_for_kv_cache_config(config, kv) >= MAX_NUM_SEQS


def test_a_bfloat16_cache_holds_twice_the_pages(gemma3_like):
    """dtype=bfloat16 on the CPU keeps a bfloat16 KV cache (runner/build.py): the worker
    reports its 2-byte pages, so vLLM fits twice the pages, and tokens, in the same memory."""
    from xla_inference.kernels import cpu_attention
    from xla_inference.runner.build import Precision

    assert cpu_attention.available(), "the native CPU attention kernel did not build"
    vllm_config, _ = gemma3_like
    blocks = {}
    for dtype in ("float32", "bfloat16"):
        worker = _worker(vllm_config, [KvLayer(FULL, 1, 32)] * 18)
        del worker._kv_torch_dtype  # the worker's own, from its precision
        worker.precision = Precision.for_platform(dtype, "cpu")
        spec = worker.get_kv_cache_spec()["model.layers.0.self_attn.attn"]
        assert spec.dtype == getattr(torch, dtype)
        blocks[dtype] = _kv_cache_config(worker, 64 << 20)[1].num_blocks
    assert blocks["bfloat16"] == 2 * blocks["float32"]
