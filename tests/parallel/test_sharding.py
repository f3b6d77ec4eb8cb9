"""Tensor and expert parallel on 8 virtual CPU devices: same logits as one device, every
array sharded as the rules table says, and no device holding a whole sharded tensor."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from tests.helpers import (ENGINE_BLOCK, engine_request, run_chunks, save_tiny_family,
                           save_tiny_model, tiny_engine)
from tests.models.test_deepseek_v3 import save_tiny_deepseek_v3
from xla_inference.parallel.sharding import LOGICAL_RULES, build_mesh, logical_sizes

PLAN = [{0: 11, 1: 9, 2: 4}, {1: 14, 2: 1}]  # a prefill, a chunked prefill, a decode step


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 128, size=n).tolist() for n in (11, 23, 5)]


_SINGLE = {}


def _single_device_logits(model_dir):
    if model_dir not in _SINGLE:
        _SINGLE[model_dir] = _logits(model_dir)[1]
    return _SINGLE[model_dir]


def _logits(model_dir, mesh=None):
    engine = tiny_engine(model_dir, mesh=mesh)
    reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(_prompts())]
    return engine, run_chunks(engine, reqs, PLAN)


def _smollm2_shaped(path):
    """SmolLM2's head layout (9 query heads, 3 KV heads) at tiny size."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, head_dim=8, bos_token_id=1, eos_token_id=2)
    return save_tiny_model(path, config)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    return {"qwen3": save_tiny_family(root / "qwen3", "qwen3"),
            "smollm2-shaped": _smollm2_shaped(root / "smol"),
            "qwen3_moe": save_tiny_family(root / "moe", "qwen3_moe"),
            "deepseek_v3": save_tiny_deepseek_v3(root / "deepseek")}


# The sharding the design promises, written out here independently of the axes each
# parameter dataclass declares: (field name, rank) -> logical axes; others replicated.
EXPECTED_AXES = {
    ("embed", 2): ("vocab", "embed"),
    ("lm_head", 2): ("vocab", "embed"),
    ("wq", 2): ("heads", "embed"),
    ("wk", 2): ("kv_heads", "embed"),
    ("wv", 2): ("kv_heads", "embed"),
    ("wo", 2): ("embed", "heads"),
    ("bq", 1): ("heads",),
    ("bk", 1): ("kv_heads",),
    ("bv", 1): ("kv_heads",),
    ("w_gate", 2): ("mlp", "embed"),
    ("w_up", 2): ("mlp", "embed"),
    ("w_down", 2): ("embed", "mlp"),
    ("wq_nope", 3): (None, "heads", None),
    ("wq_rope", 3): (None, "heads", None),
    ("w_uk", 3): ("heads", None, None),
    ("w_uv", 3): ("heads", None, None),
    ("wo", 3): ("heads", None, "embed"),
    ("w_gate", 3): ("experts", "embed", "mlp"),
    ("w_up", 3): ("experts", "embed", "mlp"),
    ("w_down", 3): ("experts", "mlp", "embed"),
}


def _expected_spec(path, leaf, cfg, tp) -> PartitionSpec:
    """The rules table read independently of partition_spec: split a logical axis only when
    its units and the array dimension divide by tp."""
    name = next(e.name for e in reversed(path) if isinstance(e, jax.tree_util.GetAttrKey))
    axes = EXPECTED_AXES.get((name, leaf.ndim), (None,) * leaf.ndim)
    sizes = logical_sizes(cfg)
    spec = []
    for a, dim in zip(axes, leaf.shape):
        even = a and sizes.get(a, 0) > 0 and sizes[a] % tp == 0 and dim % tp == 0
        mesh_axis = LOGICAL_RULES.get(a) if even else None
        spec.append(None if mesh_axis in spec else mesh_axis)
    return PartitionSpec(*spec)


def _assert_sharded_by_the_rules(engine, tp):
    cfg = engine.model_cfg

    def check(path, leaf):
        spec = _expected_spec(path, leaf, cfg, tp)
        assert leaf.sharding.spec == spec, (jax.tree_util.keystr(path), leaf.sharding.spec, spec)
        split = [i for i, s in enumerate(spec) if s is not None]
        for shard in leaf.addressable_shards:  # each device holds only its slice
            expect = tuple(d // tp if i in split else d for i, d in enumerate(leaf.shape))
            assert shard.data.shape == expect

    jax.tree_util.tree_map_with_path(check, engine.params)
    for layer_arrays in engine.kv_cache.arrays:  # K and V, or MLA's one latent array
        for array in layer_arrays:
            # MLA's latent cache has no KV heads to split (num_kv_heads absent): whole.
            kv_heads = getattr(cfg, "num_kv_heads", 0)
            want = "model" if kv_heads and kv_heads % tp == 0 else None
            assert array.sharding.spec == PartitionSpec(None, want, None)
    return sum(spec is not None for leaf in jax.tree.leaves(engine.params)
               for spec in leaf.sharding.spec)


@pytest.mark.parametrize("family,tp", [("qwen3", 2), ("qwen3", 8),
                                       ("smollm2-shaped", 2), ("smollm2-shaped", 3),
                                       ("smollm2-shaped", 4), ("qwen3_moe", 4),
                                       ("deepseek_v3", 2), ("deepseek_v3", 4)])
def test_tensor_parallel_logits_equal_one_device(models, family, tp):
    assert len(jax.devices()) >= 8
    single = _single_device_logits(models[family])
    engine, sharded = _logits(models[family], build_mesh(tp))
    num_split = _assert_sharded_by_the_rules(engine, tp)
    assert num_split > 0  # something really is split (the MLP at least)
    for key, row in single.items():
        np.testing.assert_allclose(sharded[key], row, rtol=1e-5, atol=1e-5)


def test_expert_parallel_spreads_the_experts(models):
    engine, _ = _logits(models["qwen3_moe"], build_mesh(4))
    moe_layers = [layer.mlp for layer in engine.params.layers if hasattr(layer.mlp, "router")]
    assert moe_layers
    for mlp in moe_layers:
        assert mlp.w_gate.sharding.spec[0] == "model"
        assert {s.data.shape[0] for s in mlp.w_gate.addressable_shards} == {mlp.w_gate.shape[0] // 4}


def _steps(engine, reqs):
    """PLAN's steps: each step's logits and every token's hidden state, in scheduled order."""
    out = []
    for step in PLAN:
        scheduled = [(reqs[i], n) for i, n in step.items()]
        result = engine.forward(scheduled)
        num_tokens = sum(step.values())
        out.append((np.asarray(result.logits)[:len(scheduled)],
                    np.asarray(result.hidden)[:num_tokens]))
        for req, n in scheduled:
            req.num_computed_tokens += n
    return out


def test_data_parallel_replicas_equal_one_device(models):
    """DP 2 x TP 2: requests on both replicas (known by their pages) in the same steps give
    the single device's logits and hidden states, in the scheduler's order; each replica's
    K/V lands only in its own cache, which sits on its own half of the mesh."""
    model_dir = models["qwen3"]
    single = tiny_engine(model_dir)
    engine = tiny_engine(model_dir, mesh=build_mesh(2, data_parallel_size=2))
    per = engine.blocks_per_replica
    assert (engine.replicas, per) == (2, 32)
    firsts = (1, per + 1, 9)  # r0 and r2 on replica 0, r1 on replica 1 (between them)
    expected = _steps(single, [engine_request(f"r{i}", p, 1 + 8 * i)
                               for i, p in enumerate(_prompts())])
    got = _steps(engine, [engine_request(f"r{i}", p, f)
                          for i, (p, f) in enumerate(zip(_prompts(), firsts))])
    for (want_logits, want_hidden), (logits, hidden) in zip(expected, got):
        np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(hidden, want_hidden, rtol=1e-5, atol=1e-5)
    # The local pages each replica's requests wrote (page 0, the null page, takes padding).
    pages = {0: set(), 1: set()}
    for first, tokens in zip(firsts, [sum(step.get(i, 0) for step in PLAN) for i in range(3)]):
        replica, local = divmod(first, per)
        pages[replica] |= set(range(local, local + -(-tokens // ENGINE_BLOCK)))
    for k, *_ in engine.kv_cache.arrays:
        assert k.shape[0] == 2 and tuple(k.sharding.spec)[:2] == ("data", None)
        for replica, used in pages.items():
            written = np.abs(np.asarray(k[replica])).reshape(per, -1).sum(axis=1) > 0
            assert set(np.flatnonzero(written[1:]) + 1) == used
        for shard in k.addressable_shards:  # one replica per data slice of the mesh
            assert shard.data.shape[0] == 1


def test_more_devices_than_exist_is_a_clear_error():
    with pytest.raises(ValueError, match="tensor_parallel_size=16 .* needs 16 devices"):
        build_mesh(16)


def test_loading_sends_each_device_only_its_slices(models, monkeypatch):
    """While the engine places the weights, count the bytes each device receives: at TP 4 a
    device receives only its shards and the replicated rest, far less than the whole model,
    and no sharded tensor arrives whole anywhere."""
    received = {}  # device -> bytes handed to it while placing the parameters
    whole_sharded = []  # sharded tensors some device received in full
    real = jax.make_array_from_callback

    def spy(shape, sharding, callback, *args, **kwargs):
        split = any(axis is not None for axis in sharding.spec)
        sent = {}  # this array's slices by index (a slice two devices share counts for each)

        def fetch(index):
            part = np.asarray(callback(index))
            sent[repr(index)] = part.nbytes
            if split and part.shape == tuple(shape):
                whole_sharded.append(shape)
            return part

        array = real(shape, sharding, fetch, *args, **kwargs)
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            received[device] = received.get(device, 0) + sent[repr(index)]
        return array

    monkeypatch.setattr(jax, "make_array_from_callback", spy)
    engine = tiny_engine(models["smollm2-shaped"], mesh=build_mesh(4))
    leaves = jax.tree.leaves(engine.params)
    holds = {d: sum(s.data.nbytes for leaf in leaves for s in leaf.addressable_shards
                    if s.device == d) for d in engine.mesh.devices.flat}
    assert not whole_sharded
    assert received == holds  # each device got exactly what it holds, never more
    assert max(received.values()) < 0.6 * sum(leaf.nbytes for leaf in leaves)
