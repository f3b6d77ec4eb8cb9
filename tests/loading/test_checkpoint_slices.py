"""Checkpoint tensors read slice by slice (loading/safetensors.CheckpointSlices): each slice
equals the same slice of the tensor read whole by safetensors' own reader, only its bytes
are read, placement reads each device's distinct slice once, and a model loaded with
reads_slices places exactly the parameters a whole read does, reading each checkpoint byte
once. (Across two processes, each reading half: tests/e2e/test_llm_multihost.py.)"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xla_inference.loading.safetensors import CHECKPOINT_READS, CheckpointSlices, read_safetensors
from xla_inference.parallel.sharding import build_mesh, place

INDICES = [(slice(0, 3), slice(None)), (slice(None), slice(4, 8)), (slice(2, 6), slice(3, 9)),
           (Ellipsis,), (1,), (slice(1, 8, 3), slice(None, None, 2))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A file of a float32 and a bfloat16 matrix, and the same read whole by safetensors."""
    import torch
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("slices") / "model.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"f32": torch.randn(8, 12, generator=g),
               "bf16": torch.randn(8, 12, generator=g).to(torch.bfloat16)}, path)
    whole = {name: t.float().numpy() for name, t in load_file(path).items()}
    return read_safetensors(path), whole


def _save_tiny_llama(path):
    """A 2-layer llama checkpoint of random float32 tensors (no transformers needed: only
    placement is compared here, not outputs)."""
    import json

    import torch
    from safetensors.torch import save_file

    D, F, V, H, NH, KH = 64, 96, 128, 16, 4, 2
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,),
              "lm_head.weight": (V, D)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,),
                       p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_proj.weight": (NH * H, D),
                       p + "self_attn.k_proj.weight": (KH * H, D),
                       p + "self_attn.v_proj.weight": (KH * H, D),
                       p + "self_attn.o_proj.weight": (D, NH * H),
                       p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F)})
    g = torch.Generator().manual_seed(1)
    path.mkdir()
    save_file({n: torch.randn(s, generator=g) for n, s in shapes.items()},
              path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=V, hidden_size=D,
        intermediate_size=F, num_hidden_layers=2, num_attention_heads=NH,
        num_key_value_heads=KH, head_dim=H, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=512, tie_word_embeddings=False)))
    return path


def _reads(fn):
    before = CHECKPOINT_READS.bytes
    result = fn()
    return result, CHECKPOINT_READS.bytes - before


@pytest.mark.parametrize("name", ["f32", "bf16"])
@pytest.mark.parametrize("index", INDICES, ids=str)
def test_a_slice_equals_the_whole_tensor_sliced_and_reads_only_its_bytes(checkpoint, name,
                                                                         index):
    stored, whole = checkpoint
    lazy = CheckpointSlices(stored[name], np.float32)
    part, nbytes = _reads(lambda: lazy[index])
    np.testing.assert_array_equal(part, whole[name][index])
    assert part.dtype == np.float32
    assert nbytes == part.size * stored[name].dtype.itemsize
    narrow = lazy.astype(ml_dtypes.bfloat16)  # still unread, read in the new dtype
    np.testing.assert_array_equal(narrow[index], whole[name][index].astype(ml_dtypes.bfloat16))


def test_whole_reads_and_array_operations_read_it_all(checkpoint):
    stored, whole = checkpoint
    lazy = CheckpointSlices(stored["bf16"], np.float32)
    assert (lazy.shape, lazy.ndim, lazy.nbytes) == ((8, 12), 2, 8 * 12 * 4)
    np.testing.assert_array_equal(np.asarray(lazy), whole["bf16"])
    np.testing.assert_array_equal(lazy * 2 + 1, whole["bf16"] * 2 + 1)
    np.testing.assert_array_equal(lazy.reshape(4, 24), whole["bf16"].reshape(4, 24))
    assert not hasattr(lazy, "tiled")  # a probe for another type's field reads nothing


@pytest.mark.parametrize("spec", [PartitionSpec("model", None), PartitionSpec(None, "model"),
                                  PartitionSpec("data", "model"), PartitionSpec()], ids=str)
def test_placement_reads_each_distinct_device_slice_once(checkpoint, spec):
    stored, whole = checkpoint
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    placed, nbytes = _reads(lambda: place(CheckpointSlices(stored["f32"], np.float32),
                                          NamedSharding(mesh, spec)))
    np.testing.assert_array_equal(np.asarray(placed), whole["f32"])
    assert placed.sharding.spec == spec
    assert nbytes == whole["f32"].nbytes  # replicas (data axis, or every device) share a read


@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2),
                                      dict(tensor_parallel_size=2, pipeline_parallel_size=2)],
                         ids=["tp2", "pp2xtp2"])
def test_a_model_loaded_by_slices_places_what_a_whole_read_does(tmp_path, parallel):
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    model_dir = _save_tiny_llama(tmp_path / "llama")
    stored_bytes = sum(t.nbytes for t in read_safetensors(model_dir / "model.safetensors").values())
    # bfloat16 projections from the float32 file: narrowed while still unread.
    precision = Precision(jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32), jnp.dtype(jnp.float32))
    cfg = EngineConfig(num_blocks=16, block_size=4, max_num_tokens=16, max_num_seqs=4,
                       max_model_len=32)

    def placed(reads_slices):
        model = load(model_dir, precision, reads_slices=reads_slices)
        unread = model.unread_bytes
        engine = build_engine(model, cfg, mesh=build_mesh(**parallel))
        return engine.params, unread

    (sliced, unread), nbytes = _reads(lambda: placed(True))
    (whole, none_unread), whole_nbytes = _reads(lambda: placed(False))
    assert none_unread == 0 and whole_nbytes == 0
    assert unread > 0
    assert nbytes == stored_bytes  # one process holds every slice: each byte read once
    sliced_leaves, whole_leaves = jax.tree.leaves(sliced), jax.tree.leaves(whole)
    assert len(sliced_leaves) == len(whole_leaves)
    for a, b in zip(sliced_leaves, whole_leaves):
        assert a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
