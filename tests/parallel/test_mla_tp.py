"""MLA's latent attention under tensor parallel on the 8 virtual CPU devices
(layers/mla.latent_paged_attention's split by query heads): the same cache and output as one
device, each device's native kernel call given its N / tp query heads and the whole latent
cache, no collective; and in a tiny DeepSeek-V3's compiled step every attention call takes
N / tp heads. (Its TP logits against one device: tests/parallel/test_sharding.py; against
transformers: tests/models/test_deepseek_v3.py.)"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tests.helpers import tiny_engine
from tests.models.test_deepseek_v3 import save_tiny_deepseek_v3
from tests.parallel.test_collective_matmul import collectives
from tests.parallel.test_cpu_attention_tp import _step
from xla_inference.kernels import cpu_attention
from xla_inference.kernels.metadata import LayerCache
from xla_inference.layers.mla import latent_paged_attention
from xla_inference.parallel.sharding import build_mesh, traced_over
from xla_inference.runner.requests import build_step_batch

NUM_HEADS, WIDTH = 8, 40  # query heads; latent + rope key values per token
KERNEL = "xla_inference_paged_attention"


def _latent_step(seed, cache_dtype):
    """_step's mixed batch of decodes, prefills and chunks, with MLA's shapes: q [T, N, W],
    one new latent row per token [T, 1, W], a cache [slots, 1, W] of random older rows."""
    _, (cache, _), md = _step(seed, cache_dtype=cache_dtype)
    rng = np.random.default_rng(seed + 100)
    num_tokens, slots = md.positions.shape[0], cache.shape[0]
    q = rng.standard_normal((num_tokens, NUM_HEADS, WIDTH)).astype(np.float32)
    key = rng.standard_normal((num_tokens, 1, WIDTH)).astype(np.float32)
    cache = jnp.asarray(rng.standard_normal((slots, 1, WIDTH)), cache_dtype)
    return q, key, cache, md


def _attend(q, key, cache, md, k_scale):
    kv, out = latent_paged_attention(q, key, LayerCache((cache,), np.int32(0)), md,
                                     scale=WIDTH ** -0.5, k_scale=k_scale)
    return kv.arrays[0], out


def _kernel_calls(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if KERNEL in line and "custom-call(" in line]


def _query_heads(call: str) -> int:
    """The head count the kernel call runs: its result is [T, heads, W], q's own shape
    (the compiled text does not repeat the operands' shapes)."""
    return int(re.search(r"= f32\[\d+,(\d+),\d+\]\{[0-9,]+\} custom-call\(", call).group(1))


@pytest.mark.parametrize("tp,cache_dtype,k_scale", [(2, jnp.float32, 1.0),
                                                    (4, jnp.bfloat16, 1.0),
                                                    (8, jnp.float8_e4m3fn, 0.5)])
def test_split_by_query_heads_equals_one_device(tp, cache_dtype, k_scale):
    assert cpu_attention.available(), "the native CPU attention kernel did not build"
    q, key, cache, md = _latent_step(tp, cache_dtype)
    fn = lambda q, key, cache, md: _attend(q, key, cache, md, k_scale)  # noqa: E731
    one = jax.devices()[0]
    want_cache, want = jax.jit(fn)(*jax.device_put((q, key, cache, md), one))

    mesh = build_mesh(tp)
    heads = NamedSharding(mesh, PartitionSpec(None, "model", None))
    whole = NamedSharding(mesh, PartitionSpec())
    args = (jax.device_put(q, heads), *jax.device_put((key, cache, md), whole))
    split = jax.jit(traced_over(mesh, fn))
    got_cache, got = split(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert np.array_equal(np.asarray(got_cache.astype(jnp.float32)),
                          np.asarray(want_cache.astype(jnp.float32)))
    assert got.sharding.spec == PartitionSpec(None, "model", None)
    for shard in got_cache.addressable_shards:  # every device keeps the whole latent cache
        assert shard.data.shape == cache.shape

    hlo = split.lower(*args).compile().as_text()
    assert collectives(hlo) == {}, collectives(hlo)  # nothing gathered, nothing reduced
    calls = _kernel_calls(hlo)
    assert calls and all(_query_heads(c) == NUM_HEADS // tp for c in calls), calls


def test_deepseek_step_attends_with_each_devices_heads(tmp_path):
    """The whole step of a tiny DeepSeek-V3 (4 heads) at TP 2: every layer's attention call
    on a device runs 2 heads, where before the split each ran all 4."""
    assert cpu_attention.available(), "the native CPU attention kernel did not build"
    model_dir = save_tiny_deepseek_v3(tmp_path / "deepseek")
    engine = tiny_engine(model_dir, max_num_tokens=16, mesh=build_mesh(2))
    layout = engine.layout_for(16)
    batch = build_step_batch([], layout)
    hlo = engine.lower_step(batch).compile().as_text()
    calls = _kernel_calls(hlo)
    assert len(calls) == engine.model_cfg.num_layers, calls
    assert {_query_heads(c) for c in calls} == {engine.model_cfg.num_heads // 2}, calls
