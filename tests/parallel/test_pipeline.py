"""Pipeline parallel on virtual CPU devices (parallel/pipeline.py): layers split into stages
over the mesh's stage axis give one device's logits (alone and with tensor parallel inside
each stage); each layer's weights and KV cache live only on its stage's devices; what the
stages do not serve is refused by name."""

import jax
import numpy as np
import pytest

from tests.helpers import ENGINE_BLOCK, engine_request, save_tiny_family, save_tiny_model, tiny_engine
from xla_inference.parallel.sharding import build_mesh

pytestmark = pytest.mark.slow

PLAN = [{0: 11, 1: 9, 2: 4}, {1: 14}, {2: 1}]  # prefills; one request alone (an empty micro-batch)


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 128, size=n).tolist() for n in (11, 23, 5)]


def _tiny_llama(path):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, bos_token_id=1, eos_token_id=2)
    return save_tiny_model(path, config)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return {"llama": _tiny_llama(root / "llama"),
            **{family: save_tiny_family(root / family, family, num_hidden_layers=4)
               for family in ("qwen3", "mistral", "qwen2")}}


def _steps(engine, first_blocks=(1, 9, 17)):
    """Logits and hidden states of the requests' rows and tokens in every step of PLAN."""
    reqs = [engine_request(f"r{i}", p, first) for i, (p, first) in
            enumerate(zip(_prompts(), first_blocks))]
    out = []
    for step in PLAN:
        scheduled = [(reqs[i], n) for i, n in step.items()]
        result = engine.forward(scheduled)
        out.append((np.asarray(result.logits)[:len(scheduled)],
                    np.asarray(result.hidden)[:sum(step.values())]))
        for req, n in scheduled:
            req.num_computed_tokens += n
    return out


_SINGLE = {}


def _single(model_dir):
    """One device's engine, after running PLAN, and its step outputs."""
    if model_dir not in _SINGLE:
        engine = tiny_engine(model_dir)
        _SINGLE[model_dir] = engine, _steps(engine)
    return _SINGLE[model_dir]


# Qwen3 at PP 2 and PP 2 x TP 2 runs through vllm.LLM (tests/e2e/test_llm_pipeline.py);
# Mistral's sliding window and Qwen2's biases under PP 2 x TP 2 here.
@pytest.mark.parametrize("family,pp,tp", [("llama", 2, 1), ("llama", 2, 2), ("qwen3", 4, 2),
                                          ("mistral", 2, 2), ("qwen2", 2, 2)])
def test_stages_equal_one_device(models, family, pp, tp):
    """Same logits and hidden states as one device, and every layer's K/V written on its
    own stage equal to the single device's cache of that layer."""
    single, expected = _single(models[family])
    engine = tiny_engine(models[family], mesh=build_mesh(tp, pipeline_parallel_size=pp))
    assert dict(engine.mesh.shape) == {"stage": pp, "data": 1, "model": tp}
    for (want_logits, want_hidden), (logits, hidden) in zip(expected, _steps(engine)):
        np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(hidden, want_hidden, rtol=1e-5, atol=1e-5)
    per_stage = len(single.kv_cache.arrays) // pp
    for layer, want in enumerate(single.kv_cache.arrays):
        stage, local = divmod(layer, per_stage)
        for got, w in zip(engine.kv_cache.arrays[local], want):
            assert np.abs(np.asarray(w)).sum() > 0  # the plan wrote this layer's cache
            slots = w.shape[0]
            np.testing.assert_allclose(np.asarray(got[stage * slots:(stage + 1) * slots]),
                                       np.asarray(w), rtol=1e-5, atol=1e-5)


# Replica 0 owns pages 0-31 of tiny_engine's 64, replica 1 pages 32-63 (its own null page 32).
DP_FIRST_BLOCKS = (1, 33, 41)


@pytest.mark.parametrize("pp,dp,tp", [(2, 2, 2)])
def test_stages_with_data_parallel_replicas_equal_one_device(models, pp, dp, tp):
    """PP x DP: each replica (its own requests, by their pages) runs its micro-batches over
    the stages of its own data slice: the same logits and hidden states as one device and
    as PP alone, and each replica's K/V on each stage equal to what PP alone wrote there."""
    _, expected = _single(models["llama"])
    pipeline = tiny_engine(models["llama"], mesh=build_mesh(tp, pipeline_parallel_size=pp))
    engine = tiny_engine(models["llama"], mesh=build_mesh(tp, dp, pipeline_parallel_size=pp))
    assert dict(engine.mesh.shape) == {"stage": pp, "data": dp, "model": tp}
    got, pipeline_only = _steps(engine, DP_FIRST_BLOCKS), _steps(pipeline, DP_FIRST_BLOCKS)
    # Request 0 in replica 0 (one step), requests 1 and 2 in replica 1 (two steps each).
    assert list(engine.rows_per_replica) == [1, 4]
    for (want_logits, want_hidden), (logits, hidden), (pp_logits, pp_hidden) in zip(
            expected, got, pipeline_only):
        np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(hidden, want_hidden, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logits, pp_logits, rtol=1e-5, atol=1e-5)
    # The K/V each replica wrote on each stage: those PP alone wrote at the same pages (its
    # cache, equal to one device's: test_stages_equal_one_device, holds every page).
    half = 32 * ENGINE_BLOCK  # one replica's slots
    for local, (arrays, pp_arrays) in enumerate(zip(engine.kv_cache.arrays,
                                                    pipeline.kv_cache.arrays)):
        for got_array, pp_array in zip(arrays, pp_arrays):
            assert got_array.shape[:2] == (dp, pp * half)
            assert got_array.sharding.spec[:2] == ("data", "stage")
            pp_array = np.asarray(pp_array)
            assert np.abs(pp_array).sum() > 0
            for stage in range(pp):
                for r in range(dp):
                    # Past each replica's null page (padding tokens write there).
                    first = stage * dp * half + r * half + ENGINE_BLOCK
                    np.testing.assert_allclose(
                        np.asarray(got_array[r, stage * half + ENGINE_BLOCK:(stage + 1) * half]),
                        pp_array[first:first + half - ENGINE_BLOCK], rtol=1e-5, atol=1e-5)


def _stage_of(engine, device) -> int:
    return next(s for s in range(engine.stages) if device in engine.mesh.devices[s].flat)


def test_each_layer_lives_only_on_its_stage(models):
    """PP 2 x TP 2 on a 4-layer Llama: each stage's devices hold exactly its two layers'
    weights (equal to the checkpoint's layers 0-1 on stage 0, 2-3 on stage 1) and KV
    cache, split over its own model axis; the embedding and LM head are on every stage."""
    from xla_inference.models.loader import load_model

    _, _, host = load_model(models["llama"], np.float32)
    engine = tiny_engine(models["llama"], mesh=build_mesh(2, pipeline_parallel_size=2))
    local = engine.params.layers.local
    assert len(local) == 2
    for j, layer in enumerate(local):
        for name, array in [("wq", layer.attn.wq), ("norm", layer.input_norm),
                            ("down", layer.mlp.w_down)]:
            assert array.shape[0] == 2 and array.sharding.spec[0] == "stage"
            for shard in array.addressable_shards:
                stage = _stage_of(engine, shard.device)
                assert shard.index[0] == slice(stage, stage + 1), (name, shard.index)
                want = {"wq": lambda h: h.attn.wq, "norm": lambda h: h.input_norm,
                        "down": lambda h: h.mlp.w_down}[name](host.layers[2 * stage + j])
                np.testing.assert_array_equal(np.asarray(shard.data)[0],
                                              np.asarray(want)[shard.index[1:]])
        assert any(s is not None for s in layer.attn.wq.sharding.spec[1:])  # TP inside a stage
    slots = 64 * ENGINE_BLOCK  # tiny_engine's pages x tokens per page
    for group in engine.kv_cache.arrays:
        for array in group:
            assert array.shape[0] == 2 * slots and array.sharding.spec[0] == "stage"
            for shard in array.addressable_shards:
                stage = _stage_of(engine, shard.device)
                assert shard.index[0] == slice(stage * slots, (stage + 1) * slots)
    # Every device holds a quarter of the layers' bytes (its stage's half, split in two).
    layer_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(local))
    for device in engine.mesh.devices.flat:
        held = sum(s.data.nbytes for leaf in jax.tree.leaves(local)
                   for s in leaf.addressable_shards if s.device == device)
        assert held <= layer_bytes // 2


def test_what_stages_do_not_serve_is_refused(models, tmp_path):
    moe = save_tiny_family(tmp_path / "moe", "qwen3_moe", num_hidden_layers=2)
    with pytest.raises(ValueError, match="pipeline parallel with the qwen3_moe family"):
        tiny_engine(moe, mesh=build_mesh(1, pipeline_parallel_size=2))
    three = save_tiny_family(tmp_path / "three", "qwen3", num_hidden_layers=3)
    with pytest.raises(ValueError, match="3 layers in 2 stages"):
        tiny_engine(three, mesh=build_mesh(1, pipeline_parallel_size=2))
    with pytest.raises(ValueError, match="pipeline_parallel_size=4 needs 16 devices"):
        build_mesh(2, 2, pipeline_parallel_size=4)


def test_step_updates_each_stage_cache_in_place(models):
    """The compiled PP 2 x TP 2 step (one KV head per device) copies no cache array: each
    stage's branch writes its pages in place. (With the cache stacked [N, slots, K, H] and
    squeezed inside the stage, XLA chose another layout there and copied every layer's
    cache in and out of the branch each step.)"""
    import re

    engine = tiny_engine(models["llama"], mesh=build_mesh(2, pipeline_parallel_size=2))
    step = engine._microbatch_batch([(engine_request("a", [5] * 8, 1), 8),
                                     (engine_request("b", [6] * 8, 9), 8)])
    hlo = engine.lower_step(*step).compile().as_text()
    slots, heads, size = engine.kv_cache.arrays[0][0].shape
    local = rf"f32\[{slots // 2},{heads // 2},{size}\]"
    assert re.search(local, hlo)  # the shape as the stage sees it
    assert not re.search(local + r"\{[0-9,]+\} copy\(", hlo)
