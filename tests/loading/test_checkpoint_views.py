"""Checkpoint tensors read per host through a loader's views (loading/safetensors.
CheckpointSlices' transpose, axis-splitting reshape and select; loading/params.part): MoE
experts stored fused [E, ...] (Llama 4's `experts.gate_up_proj` [E, D, 2F] and `down_proj`,
transformers' in-memory layout [E, 2F, D] taken transposed) and MLA's per-head matrices
cut from q_b_proj, kv_b_proj and o_proj (models/deepseek_v3.load_mla). Each view's slice
equals the float64 tensor put through the same numpy operations and sliced, reading just
its elements' bytes; a host holding 1/4 of the devices reads 1/4 of the tensor; a tiny
DeepSeek-V3 (TP 4) and Llama 4 (DP 2 x TP 2, expert parallel) loaded by slice place what a
whole read places, each checkpoint byte read once."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xla_inference.loading.params import part
from xla_inference.loading.safetensors import CHECKPOINT_READS, CheckpointSlices, read_safetensors
from xla_inference.parallel.sharding import REPLICAS_AND_TENSOR, build_mesh, place

N, P, R, H, L, Q, D = 8, 6, 4, 5, 12, 10, 7  # heads, nope/rope/value dims, latent, q rank, model
E, F = 8, 8  # experts, expert width
ROPE_ORDER = np.array([0, 2, 1, 3])  # interleaved rope dims into rotate-half order


def _reads(fn):
    before = CHECKPOINT_READS.bytes
    result = fn()
    return result, CHECKPOINT_READS.bytes - before


# name -> (stored shape, views(tensor) -> {view: array}, the view axis that the per-head or
# per-expert split cuts). The same functions make the lazy views and, on the float64 array,
# the reference.
def _kv_b(t):
    v = t.reshape(N, P + H, L)
    return {"w_uk": part(v, (slice(None), slice(0, P))),
            "w_uv": part(v, (slice(None), slice(P, P + H))).transpose(0, 2, 1)}


def _q_b(t):  # stored [N (P + R), Q], taken [Q, N, P + R]
    v = t.T.reshape(Q, N, P + R)
    return {"wq_nope": part(v, (..., slice(0, P))), "wq_rope": part(v, (..., P + ROPE_ORDER))}


def _halves(v):
    return {"gate": part(v, (..., slice(0, F))), "up": part(v, (..., slice(F, 2 * F)))}


VIEWS = {
    "mla_kv_b": ((N * (P + H), L), _kv_b, 0),
    "mla_q_b": ((N * (P + R), Q), _q_b, 1),
    "mla_o": ((D, N * H), lambda t: {"wo": t.T.reshape(N, H, D)}, 0),
    "llama4_gate_up": ((E, D, 2 * F), _halves, 0),
    "llama4_gate_up_width": ((E, D, 2 * F), _halves, 2),
    "fused_gate_up_transposed": ((E, 2 * F, D), lambda t: _halves(t.transpose(0, 2, 1)), 0),
    "fused_down_transposed": ((E, D, F), lambda t: {"down": t.transpose(0, 2, 1)}, 1),
}


@pytest.fixture(scope="module", params=["f32", "bf16"])
def stored(request, tmp_path_factory):
    """Every VIEWS tensor in one safetensors file (memory-mapped, as a checkpoint's) and its
    float64 values."""
    from safetensors.numpy import save_file

    dtype = np.float32 if request.param == "f32" else ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(shape).astype(dtype)
               for name, (shape, _, _) in VIEWS.items()}
    path = tmp_path_factory.mktemp("views") / "model.safetensors"
    save_file(tensors, path)
    return read_safetensors(path), {n: t.astype(np.float64) for n, t in tensors.items()}


def _indices(shape, axis):
    """What placement and a loader ask of a view: all of it, each quarter along the split
    axis, a width cut of the last axis, a strided and an integer index."""
    n, last = shape[axis], len(shape) - 1
    cut = lambda i: tuple(i if k == axis else slice(None) for k in range(len(shape)))  # noqa: E731
    quarters = [cut(slice(k * n // 4, (k + 1) * n // 4)) for k in range(4)]
    return [(Ellipsis,), *quarters, (..., slice(1, shape[last] - 1)),
            cut(slice(1, None, 3)), cut(n - 1)] + ([(0, slice(None, None, 2))] if axis else [])


@pytest.mark.parametrize("name", VIEWS)
def test_a_view_slice_equals_the_float64_tensor_put_through_numpy_and_reads_only_its_bytes(
        stored, name):
    files, reference = stored
    shape, views, axis = VIEWS[name]
    itemsize = files[name].dtype.itemsize
    lazy_views, nbytes = _reads(lambda: views(CheckpointSlices(files[name], np.float32)))
    assert nbytes == 0  # views are not reads
    want_views = views(reference[name])
    for key, lazy in lazy_views.items():
        want = want_views[key]
        assert isinstance(lazy, CheckpointSlices) and lazy.shape == want.shape
        for index in _indices(want.shape, axis):
            got, nbytes = _reads(lambda: lazy[index])
            assert got.dtype == np.float32 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, want[index].astype(np.float32), err_msg=str(index))
            assert nbytes == got.size * itemsize, index
        whole, nbytes = _reads(lambda: np.asarray(lazy))  # read whole, then sliced: the same
        np.testing.assert_array_equal(whole, want.astype(np.float32))
        narrow = lazy.astype(ml_dtypes.bfloat16)  # still unread; read in the new dtype
        np.testing.assert_array_equal(narrow[..., :2], want[..., :2].astype(ml_dtypes.bfloat16))


def test_a_merging_reshape_reads_whole_and_select_refuses_an_integer(stored):
    files, reference = stored
    lazy = CheckpointSlices(files["llama4_gate_up"], np.float32)
    merged, nbytes = _reads(lambda: lazy.transpose(1, 0, 2).reshape(D, -1))
    assert isinstance(merged, np.ndarray) and nbytes == files["llama4_gate_up"].nbytes
    np.testing.assert_array_equal(
        merged, reference["llama4_gate_up"].transpose(1, 0, 2).reshape(D, -1).astype(np.float32))
    with pytest.raises(TypeError, match="one-element slice"):
        lazy.select((0,))


@pytest.mark.parametrize("name", VIEWS)
def test_a_host_holding_a_quarter_reads_a_quarter(stored, name):
    """Each view split along its axis over a (4, 2) mesh's eight devices: placement places
    the float64 reference, reading each stored byte once; a "host" holding one data row
    (two devices: what a process of a four-host mesh holds) reads 1/4 of the tensor."""
    files, reference = stored
    shape, views, axis = VIEWS[name]
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    want_views = views(reference[name])
    total = files[name].nbytes

    def sharding(view):
        spec = [None] * view.ndim
        spec[axis] = REPLICAS_AND_TENSOR
        return NamedSharding(mesh, PartitionSpec(*spec))

    placed, nbytes = _reads(lambda: {k: place(v, sharding(v)) for k, v in
                                     views(CheckpointSlices(files[name], np.float32)).items()})
    assert nbytes == total  # one process holds every slice: each byte read once
    for key, array in placed.items():
        np.testing.assert_array_equal(np.asarray(array), want_views[key].astype(np.float32))

    host = mesh.devices[0]
    held = 0
    for key, view in views(CheckpointSlices(files[name], np.float32)).items():
        indices = sharding(view).devices_indices_map(view.shape)
        for device in host:
            got, nbytes = _reads(lambda: view[indices[device]])
            np.testing.assert_array_equal(got, want_views[key][indices[device]].astype(np.float32))
            held += nbytes
    assert held == total // 4


def _placed(model_dir, mesh, reads_slices, expert_parallel=False):
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    cfg = EngineConfig(num_blocks=16, block_size=4, max_num_tokens=16, max_num_seqs=4,
                       max_model_len=32)
    model = load(model_dir, Precision.uniform(jnp.float32), reads_slices=reads_slices)
    host = model.params
    engine = build_engine(model, cfg, mesh=mesh, expert_parallel=expert_parallel)
    return engine.params, host


def _same_placement(sliced, whole):
    sliced_leaves, whole_leaves = jax.tree.leaves(sliced), jax.tree.leaves(whole)
    assert len(sliced_leaves) == len(whole_leaves)
    for a, b in zip(sliced_leaves, whole_leaves):
        assert a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _stored_bytes(model_dir) -> int:
    return sum(t.nbytes for t in read_safetensors(model_dir / "model.safetensors").values())


def test_deepseek_v3_loaded_by_slices_places_what_a_whole_read_does(tmp_path):
    """MLA's per-head matrices (and the routers, transposed) stay unread until placement
    at TP 4, which places the whole read's arrays, each checkpoint byte read once."""
    from tests.models.test_deepseek_v3 import save_tiny_deepseek_v3

    model_dir = save_tiny_deepseek_v3(tmp_path / "ds")
    (sliced, host), nbytes = _reads(lambda: _placed(model_dir, build_mesh(4), True))
    (whole, _), whole_nbytes = _reads(lambda: _placed(model_dir, build_mesh(4), False))
    attn = host.layers[1].attn
    for field in ("wq_nope", "wq_rope", "w_uk", "w_uv", "wo"):
        assert isinstance(getattr(attn, field), CheckpointSlices), field
    assert whole_nbytes == 0 and nbytes == _stored_bytes(model_dir)
    _same_placement(sliced, whole)
    assert sliced.layers[1].attn.w_uk.sharding.spec[0] == "model"  # split by heads


def test_llama4_fused_experts_loaded_by_slices_place_what_a_whole_read_does(tmp_path):
    """Llama 4's experts stored fused ([E, D, 2F] gate_up_proj, [E, F, D] down_proj) stay
    unread until placement at DP 2 x TP 2 with expert parallel (one expert a device), which
    places the whole read's arrays, each checkpoint byte read once."""
    from tests.helpers import save_tiny_family

    model_dir = save_tiny_family(tmp_path / "l4", "llama4")
    mesh = build_mesh(tensor_parallel_size=2, data_parallel_size=2)
    (sliced, host), nbytes = _reads(lambda: _placed(model_dir, mesh, True, True))
    (whole, _), whole_nbytes = _reads(lambda: _placed(model_dir, mesh, False, True))
    moe = host.layers[1].mlp
    assert all(isinstance(w, CheckpointSlices) for w in (moe.w_gate, moe.w_up, moe.w_down))
    assert whole_nbytes == 0 and nbytes == _stored_bytes(model_dir)
    _same_placement(sliced, whole)
    assert sliced.layers[1].mlp.w_gate.sharding.spec[0] is not None  # split by expert


def test_an_fp8_block_deepseek_v3_loaded_by_slices_places_what_a_whole_read_does(tmp_path):
    """DeepSeek-V3 with its MLA projections FP8 in 128 x 128 blocks (compressed-tensors, as
    the released checkpoints; heads of 128 key and 128 value rows, as theirs): the per-head
    matrices, dequantized at load, stay unread until placement (each view read dequantized
    by runs of whole blocks: loading/safetensors.CheckpointSlices over a
    quantization/sliced.QuantSlices), which places the whole read's arrays; a host holding
    a quarter of the heads reads a quarter of kv_b_proj's bytes."""
    from tests.models.test_deepseek_v3 import save_tiny_deepseek_v3
    from tests.quantization.checkpoints import save_compressed_tensors

    base = save_tiny_deepseek_v3(tmp_path / "ds", num_attention_heads=8, num_key_value_heads=8,
                                 qk_nope_head_dim=128, v_head_dim=128)
    model_dir = save_compressed_tensors(tmp_path / "q", "FP8_BLOCK", base=base).path
    mesh = build_mesh(4)
    (sliced, host), nbytes = _reads(lambda: _placed(model_dir, mesh, True))
    (whole, _), whole_nbytes = _reads(lambda: _placed(model_dir, mesh, False))
    attn = host.layers[1].attn
    for field in ("wq_nope", "wq_rope", "w_uk", "w_uv", "wo"):
        assert isinstance(getattr(attn, field), CheckpointSlices), field
    _same_placement(sliced, whole)

    w_uk, w_uv = attn.w_uk, attn.w_uv  # [N, P, L], [N, L, H]
    _, all_bytes = _reads(lambda: (w_uk[:], w_uv[:]))
    quarter, quarter_bytes = _reads(lambda: (w_uk[:2], w_uv[:2]))
    np.testing.assert_array_equal(quarter[0], np.asarray(whole.layers[1].attn.w_uk)[:2])
    assert abs(quarter_bytes - all_bytes / 4) <= 0.05 * all_bytes, (quarter_bytes, all_bytes)
