"""MoE expert stacks read per host (loading/safetensors.ExpertStackSlices): each expert's
checkpoint tensor [out, in] read only where placement asks, as the stack [E, in, out].
A slice equals the float64 stack of the checkpoint's experts, transposed, sliced; only its
bytes are read; a host holding half the experts (expert parallel) or half of each
expert's width reads half the expert bytes; and a tiny Qwen3-MoE and Mixtral loaded with
reads_slices place exactly what a whole read does, each checkpoint byte read once."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xla_inference.loading.safetensors import (CHECKPOINT_READS, ExpertStackSlices,
                                               read_safetensors)
from xla_inference.parallel.sharding import REPLICAS_AND_TENSOR, build_mesh, place

E, OUT, IN = 8, 16, 24
INDICES = [(Ellipsis,), (slice(0, 4),), (slice(4, 8), slice(None), slice(6, 12)),
           (slice(None), slice(8, 16)), (3,), (slice(1, 8, 3), 2, slice(None, None, 2))]


def _reads(fn):
    before = CHECKPOINT_READS.bytes
    result = fn()
    return result, CHECKPOINT_READS.bytes - before


@pytest.fixture(scope="module", params=["f32", "bf16"])
def experts(request, tmp_path_factory):
    """E expert tensors [OUT, IN] in one file (memory-mapped, as a checkpoint's), and the
    float64 stack [E, IN, OUT] they make, transposed."""
    from safetensors.numpy import save_file

    dtype = np.float32 if request.param == "f32" else ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    tensors = {f"experts.{e}.w": rng.standard_normal((OUT, IN)).astype(dtype) for e in range(E)}
    path = tmp_path_factory.mktemp("experts") / "model.safetensors"
    save_file(tensors, path)
    stored = read_safetensors(path)
    parts = [stored[f"experts.{e}.w"] for e in range(E)]
    reference = np.stack([tensors[f"experts.{e}.w"].astype(np.float64).T for e in range(E)])
    return parts, reference


@pytest.mark.parametrize("index", INDICES, ids=str)
def test_a_slice_equals_the_float64_stack_sliced_and_reads_only_its_bytes(experts, index):
    parts, reference = experts
    lazy = ExpertStackSlices(parts, np.float32)
    assert lazy.shape == (E, IN, OUT) and lazy.nbytes == E * IN * OUT * 4
    part, nbytes = _reads(lambda: lazy[index])
    want = reference[index]
    assert part.shape == want.shape and part.dtype == np.float32
    np.testing.assert_array_equal(part, want.astype(np.float32))
    assert nbytes == part.size * parts[0].dtype.itemsize
    narrow = lazy.astype(ml_dtypes.bfloat16)  # still unread; read in the new dtype
    np.testing.assert_array_equal(narrow[index], want.astype(ml_dtypes.bfloat16))


def test_whole_reads_and_array_operations_read_it_all(experts):
    parts, reference = experts
    lazy = ExpertStackSlices(parts, np.float32)
    whole, nbytes = _reads(lambda: np.asarray(lazy))
    np.testing.assert_array_equal(whole, reference.astype(np.float32))
    assert nbytes == E * IN * OUT * parts[0].dtype.itemsize
    np.testing.assert_array_equal(lazy[..., :4] * 2, reference[..., :4].astype(np.float32) * 2)


# Over data x model together (parallel/sharding.expert_spec): expert parallel (each device
# a block of experts), the MLP width split (the output axis for gate/up, [E, D, F]; the
# input axis for down, [E, F, D]); and replicated.
SPECS = {"experts": PartitionSpec(REPLICAS_AND_TENSOR, None, None),
         "width_out": PartitionSpec(None, None, REPLICAS_AND_TENSOR),
         "width_in": PartitionSpec(None, REPLICAS_AND_TENSOR, None),
         "replicated": PartitionSpec()}


@pytest.mark.parametrize("split", SPECS)
def test_a_host_reads_only_its_devices_experts(experts, split):
    """Placement over a 2 x 4 mesh places the float64 stack; a "host" that holds the first
    data row's four devices (what a process of a two-host mesh holds) reads half the
    expert bytes when they are split, all of them when replicated."""
    parts, reference = experts
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    sharding = NamedSharding(mesh, SPECS[split])
    placed, nbytes = _reads(lambda: place(ExpertStackSlices(parts, np.float32), sharding))
    np.testing.assert_array_equal(np.asarray(placed), reference.astype(np.float32))
    total = E * IN * OUT * parts[0].dtype.itemsize
    assert nbytes == total  # one process holds every slice: each byte read once

    host = mesh.devices[0]  # one data row: four devices
    lazy = ExpertStackSlices(parts, np.float32)
    indices = sharding.devices_indices_map(lazy.shape)
    distinct = {tuple((s.start, s.stop) for s in indices[d]): indices[d] for d in host}
    held, host_bytes = _reads(lambda: [lazy[i] for i in distinct.values()])
    for i, part in zip(distinct.values(), held):
        np.testing.assert_array_equal(part, reference[i].astype(np.float32))
    assert host_bytes == (total if split == "replicated" else total // 2)


def _save_tiny_moe(path, family: str, expert_dtype):
    """A 2-layer Qwen3-MoE or Mixtral checkpoint of random tensors, experts one tensor each
    (`experts.{e}.{gate,up,down}_proj` / `experts.{e}.w1,w3,w2`) in `expert_dtype`."""
    from safetensors.numpy import save_file

    D, F, V, H, NH, KH = 64, 32, 128, 32, 4, 2
    rng = np.random.default_rng(1)
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,),
              "lm_head.weight": (V, D)}
    expert_shapes = {}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,),
                       p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_proj.weight": (NH * H, D),
                       p + "self_attn.k_proj.weight": (KH * H, D),
                       p + "self_attn.v_proj.weight": (KH * H, D),
                       p + "self_attn.o_proj.weight": (D, NH * H)})
        if family == "qwen3_moe":
            shapes.update({p + "self_attn.q_norm.weight": (H,), p + "self_attn.k_norm.weight": (H,),
                           p + "mlp.gate.weight": (E, D)})
            names, prefix = ("gate_proj", "up_proj", "down_proj"), p + "mlp.experts."
        else:
            shapes[p + "block_sparse_moe.gate.weight"] = (E, D)
            names, prefix = ("w1", "w3", "w2"), p + "block_sparse_moe.experts."
        for e in range(E):
            for name, shape in zip(names, [(F, D), (F, D), (D, F)]):
                expert_shapes[f"{prefix}{e}.{name}.weight"] = shape
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    tensors.update({n: rng.standard_normal(s).astype(expert_dtype)
                    for n, s in expert_shapes.items()})
    path.mkdir()
    save_file(tensors, path / "model.safetensors")
    config = dict(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=NH,
                  num_key_value_heads=KH, head_dim=H, rms_norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=512, tie_word_embeddings=False,
                  num_experts_per_tok=2)
    if family == "qwen3_moe":
        config.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                      intermediate_size=96, moe_intermediate_size=F, num_experts=E,
                      norm_topk_prob=True)
    else:
        config.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
                      intermediate_size=F, num_local_experts=E)
    (path / "config.json").write_text(json.dumps(config))
    return path, tensors


@pytest.mark.parametrize("family,expert_dtype,parallel", [
    ("qwen3_moe", ml_dtypes.bfloat16, dict(data_parallel_size=2, tensor_parallel_size=2,
                                           expert_parallel=True)),
    ("mixtral", np.float32, dict(data_parallel_size=2, tensor_parallel_size=2)),
], ids=["qwen3_moe-bf16-ep", "mixtral-f32-width"])
def test_a_moe_model_loaded_by_slices_places_what_a_whole_read_does(tmp_path, family,
                                                                     expert_dtype, parallel):
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    model_dir, tensors = _save_tiny_moe(tmp_path / family, family, expert_dtype)
    # Every tensor, the routers ([E, D], transposed at load: a view not read yet) included.
    stored_bytes = sum(t.nbytes for t in tensors.values())
    precision = Precision(jnp.dtype(jnp.float32), jnp.dtype(jnp.float32), jnp.dtype(jnp.float32))
    cfg = EngineConfig(num_blocks=16, block_size=4, max_num_tokens=16, max_num_seqs=4,
                       max_model_len=32)
    expert_parallel = parallel.pop("expert_parallel", False)

    def placed(reads_slices):
        model = load(model_dir, precision, reads_slices=reads_slices)
        stacks = [layer.mlp.w_down for layer in model.params.layers
                  if hasattr(layer.mlp, "w_down") and np.ndim(layer.mlp.w_down) == 3]
        engine = build_engine(model, cfg, mesh=build_mesh(**parallel),
                              expert_parallel=expert_parallel)
        return engine.params, stacks

    (sliced, lazy_stacks), nbytes = _reads(lambda: placed(True))
    (whole, _), whole_nbytes = _reads(lambda: placed(False))
    assert lazy_stacks and all(isinstance(s, ExpertStackSlices) for s in lazy_stacks)
    assert whole_nbytes == 0
    assert nbytes == stored_bytes  # one process holds every slice: each byte read once
    sliced_leaves, whole_leaves = jax.tree.leaves(sliced), jax.tree.leaves(whole)
    assert len(sliced_leaves) == len(whole_leaves)
    for a, b in zip(sliced_leaves, whole_leaves):
        assert a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The experts against the checkpoint in float64: layer 1's down stack, [E, F, D].
    mlp = sliced.layers[1].mlp
    names = ("down_proj", "mlp") if family == "qwen3_moe" else ("w2", "block_sparse_moe")
    reference = np.stack([tensors[f"model.layers.1.{names[1]}.experts.{e}.{names[0]}.weight"]
                          .astype(np.float64).T for e in range(E)])
    np.testing.assert_array_equal(np.asarray(mlp.w_down, np.float64), reference)
    split = mlp.w_down.sharding.spec
    assert split[0 if expert_parallel else 1] is not None  # experts / width actually split


def test_quantized_experts_loaded_by_slices_place_what_a_whole_read_does(tmp_path):
    """A GPTQ 4-bit Qwen3-MoE at DP 2 x TP 2 with expert parallel (2 experts a device):
    the experts stay unread until placement (quantization/experts.ExpertSlices), which
    places the whole read's packed arrays; a host holding half the experts reads about
    half of a stack's bytes."""
    from tests.helpers import engine_request, run_chunks
    from tests.quantization.test_moe_quantized import save_gptq_moe
    from xla_inference.quantization.experts import ExpertSlices, PackedExperts
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    src, _ = _save_tiny_moe(tmp_path / "moe", "qwen3_moe", np.float32)
    gptq, _ = save_gptq_moe(src, tmp_path / "q")
    precision = Precision.uniform(jnp.float32)
    cfg = EngineConfig(num_blocks=64, block_size=4, max_num_tokens=32, max_num_seqs=8,
                       max_model_len=128)

    def placed(reads_slices):
        model = load(gptq, precision, reads_slices=reads_slices)
        moe = model.params.layers[1].mlp
        experts = sum(w.nbytes for w in (moe.w_gate, moe.w_up, moe.w_down))
        assert model.unread_bytes >= (experts if reads_slices else 0)  # what placement reads
        engine = build_engine(model, cfg, mesh=build_mesh(data_parallel_size=2,
                                                          tensor_parallel_size=2),
                              expert_parallel=True)
        # A step on each replica (pages 1.. and 33..): the placed experts serve.
        reqs = [engine_request("a", [5, 9, 14, 3, 77, 21, 40], 1),
                engine_request("b", [101, 7, 66, 12, 8], 33)]
        return engine.params, moe, run_chunks(engine, reqs, [{0: 7, 1: 5}])

    sliced, lazy, sliced_logits = placed(True)
    whole, read, whole_logits = placed(False)
    assert sliced_logits.keys() == whole_logits.keys()
    for key, row in whole_logits.items():
        np.testing.assert_allclose(sliced_logits[key], row, rtol=1e-5, atol=1e-5)
    assert isinstance(lazy.w_down, PackedExperts)
    assert isinstance(lazy.w_down.values, ExpertSlices) and isinstance(read.w_down.values,
                                                                       np.ndarray)
    sliced_leaves, whole_leaves = jax.tree.leaves(sliced), jax.tree.leaves(whole)
    assert len(sliced_leaves) == len(whole_leaves)
    for a, b in zip(sliced_leaves, whole_leaves):
        # Offsets read by block are float32 where the whole read finds every one a float16
        # (packed.PackedSlices: that test would need them all): the same numbers.
        assert a.dtype == b.dtype or (a.dtype, b.dtype) == (np.float32, np.float16)
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b, a.dtype))
    assert sliced.layers[1].mlp.w_down.values.sharding.spec[0] is not None  # split by expert

    stack = lazy.w_gate
    arrays = [a for a in (stack.values, stack.scales, stack.offsets) if a is not None]
    _, all_bytes = _reads(lambda: [a[:] for a in arrays])
    _, half_bytes = _reads(lambda: [a[:E // 2] for a in arrays])
    assert abs(half_bytes - all_bytes / 2) <= 0.05 * all_bytes, (half_bytes, all_bytes)
