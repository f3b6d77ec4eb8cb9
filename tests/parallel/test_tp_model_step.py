"""A tiny Llama's engine step under tensor parallel 2 and 4 with the step traced over the
mesh (as runner/engine.py's step is, through parallel/sharding.traced_over): the attention
output and MLP down projections run as collective matmul rings and the native CPU attention
is split by KV heads. Same logits as one device (prefill, chunked prefill, decode), and the
compiled step holds the rings (collective permutes) and gathers no KV cache."""

import re

import jax
import numpy as np
import pytest

from tests.helpers import engine_request, save_tiny_model
from tests.parallel.test_collective_matmul import collectives
from tests.parallel.test_sharding import _logits, _single_device_logits
from xla_inference.kernels import cpu_attention
from xla_inference.parallel import collective_matmul
from xla_inference.parallel.sharding import build_mesh
from xla_inference.runner.requests import build_step_batch

NUM_LAYERS = 2


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=8, num_key_value_heads=4, head_dim=16, bos_token_id=1,
        eos_token_id=2)
    return save_tiny_model(tmp_path_factory.mktemp("tp_llama"), config)


def _cache_gathers(hlo: str, engine) -> list[str]:
    """all-gathers whose result has a KV cache array's whole shape."""
    k = engine.kv_cache.arrays[0][0]
    whole = r"\[" + ",".join(map(str, k.shape)) + r"\]\{[0-9,]+\} all-gather\("
    return re.findall(whole, hlo)


def _step_hlo(engine, num_tokens: int) -> str:
    """The compiled step program for a step of one request's num_tokens new tokens."""
    req = engine_request("hlo", list(range(3, 3 + num_tokens)), 1)
    batch = build_step_batch([(req, num_tokens)], engine.layout_for(num_tokens))
    return engine.lower_step(batch).compile().as_text()


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_tiny_llama_step_with_rings_and_split_attention_equals_one_device(llama, tp,
                                                                          monkeypatch):
    assert cpu_attention.available(), "the native CPU attention kernel did not build"
    # The ring at every step size (on the CPU it is off by default: collective_matmul.py).
    # The policy is no part of JAX's trace cache key: traces made under another are dropped.
    monkeypatch.setattr(collective_matmul, "RING_POLICY", "always")
    jax.clear_caches()
    single = _single_device_logits(llama)
    mesh = build_mesh(tp)
    with jax.set_mesh(mesh):  # what the engine's traced_over gives its step
        engine, sharded = _logits(llama, mesh)
    for key, row in single.items():
        np.testing.assert_allclose(sharded[key], row, rtol=1e-5, atol=1e-5)

    for bucket in (1, 16):  # a decode step, a prefill
        with jax.set_mesh(mesh):
            hlo = _step_hlo(engine, bucket)
        found = collectives(hlo)
        assert "xla_inference_paged_attention" in hlo
        assert not _cache_gathers(hlo, engine), (bucket, found)
        # Two rings per layer (attention output, MLP down), tp - 1 hops each; the only
        # all-reduce left is the vocabulary-split embedding lookup's.
        assert found.get("collective-permute", 0) == 2 * NUM_LAYERS * (tp - 1), (bucket, found)
        assert found.get("all-reduce", 0) <= 1, (bucket, found)


def test_cpu_default_splits_attention_and_keeps_the_all_reduce(llama):
    """The CPU's default (collective_matmul.ring_pays): the attention split by KV heads
    (no cache gathered), the row-parallel products left to GSPMD's all-reduce."""
    mesh = build_mesh(2)
    jax.clear_caches()  # no trace kept from a test that forced the ring
    with jax.set_mesh(mesh):
        engine, sharded = _logits(llama, mesh)
        hlo = _step_hlo(engine, 16)
    for key, row in _single_device_logits(llama).items():
        np.testing.assert_allclose(sharded[key], row, rtol=1e-5, atol=1e-5)
    found = collectives(hlo)
    assert not _cache_gathers(hlo, engine) and "collective-permute" not in found, found
    assert found.get("all-reduce", 0) >= 2 * NUM_LAYERS, found
