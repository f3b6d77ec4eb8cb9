"""Quantized weights read by the slice, as a multi-host process reads them
(quantization/sliced.py, formats/slicing.py, loading/gguf.sliced_blocks): every slice that
placement asks of a packed weight equals the same slice of the weight read and packed
whole, each block dequantizes to the float64 reference of the checkpoint's writer, and a
host that holds 1/N of a weight reads about 1/N of its bytes. (Across two processes:
tests/e2e/test_llm_multihost.py's quantized test.)"""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tests.loading.test_gguf import llama_metadata, llama_shapes, random_values, write_gguf
from tests.quantization.test_gguf_blocks import blocks_for
from tests.quantization.checkpoints import linear_prefixes
from xla_inference.loading.checkpoint import load_checkpoint
from xla_inference.loading.safetensors import CHECKPOINT_READS, read_safetensors
from xla_inference.parallel.sharding import place
from xla_inference.quantization.packed import PackedWeight, pack
from xla_inference.quantization.sliced import QuantSlices

FORMATS = ["ct-w8a8", "ct-w8a8-tensor", "ct-fp8-channel", "ct-fp8-block", "ct-w4a16",
           "ct-w4a16-asym", "ct-w4a16-channel", "ct-w8a16-asym", "awq-g32", "gptq-4bit-sym",
           "gptq-4bit-asym", "gptq-4bit-channel", "gptq-4bit-desc-act", "gptq-8bit-asym"]
ARRAYS = ("values", "scales", "offsets")


def _reads(fn):
    before = CHECKPOINT_READS.bytes
    result = fn()
    return result, CHECKPOINT_READS.bytes - before


def _both(path, name):
    """(the weight as a host reads it by slice, the weight read whole) of tensor `name`."""
    _, sliced = load_checkpoint(path, reads_slices=True)
    _, whole = load_checkpoint(path)
    lazy, nbytes = _reads(lambda: sliced.quantized_weight(name))
    assert isinstance(lazy, QuantSlices), name
    # Making it reads no row: a per-tensor scale at most, and GPTQ's g_idx (checked whole).
    assert nbytes <= 4 * lazy.shape[1] + 64, f"{name}: making it read {nbytes} bytes"
    return lazy, whole.quantized_weight(name)


def _even_indices(shape, axis, n):
    """Each of n devices' index when `axis` is split n ways (as placement asks; an axis
    that does not divide is not split, as parallel/sharding.partition_spec decides)."""
    if shape[axis] % n:
        return [tuple(slice(None) for _ in shape)] * n
    step = shape[axis] // n
    return [tuple(slice(k * step, (k + 1) * step) if a == axis else slice(None)
                  for a in range(len(shape))) for k in range(n)]


def _check_packed_slices(lazy_packed: PackedWeight, whole_packed: PackedWeight, label):
    assert (lazy_packed.kind, lazy_packed.group_size, lazy_packed.shape) == (
        whole_packed.kind, whole_packed.group_size, whole_packed.shape), label
    for name in ARRAYS:
        lazy, whole = getattr(lazy_packed, name), getattr(whole_packed, name)
        assert (lazy is None) == (whole is None), (label, name)
        if whole is None:
            continue
        assert lazy.shape == whole.shape and lazy.read_by_slice, (label, name)
        # float16 only where the whole read's packing is float16 too (else float32: exact).
        assert lazy.dtype == whole.dtype or lazy.dtype == np.float32, (label, name)
        for axis in (0, 1):  # row tiles (column parallel), input chunks or groups (row parallel)
            for n in (1, 2, 4):
                if whole.shape[axis] % n:
                    continue
                for index in _even_indices(whole.shape, axis, n):
                    np.testing.assert_array_equal(lazy[index], whole[index],
                                                  err_msg=f"{label} {name} {index}")
        # Odd splits: uneven row tiles, and edges inside a format's group or packed word
        # (read from the whole module and cut).
        for index in [(slice(0, 1),), (slice(1, whole.shape[0]),),
                      (slice(None), slice(1, max(2, whole.shape[1] - 1))),
                      (slice(0, 1), slice(whole.shape[1] // 3, whole.shape[1]))]:
            np.testing.assert_array_equal(lazy[index], whole[index],
                                          err_msg=f"{label} {name} {index}")
    np.testing.assert_array_equal(np.asarray(lazy_packed.values), whole_packed.values)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_slice_equals_the_whole_weight_packed_and_sliced(quantized_checkpoint, fmt):
    ck = quantized_checkpoint(fmt)
    for prefix in linear_prefixes()[:7]:  # one layer: q, k, v, o, gate, up, down
        if prefix in ck.unquantized:
            continue
        lazy, whole = _both(ck.path, prefix + "weight")
        assert (lazy.shape, lazy.kind, lazy.group_size, lazy.activations) == (
            whole.shape, whole.kind, whole.group_size, whole.activations)
        _check_packed_slices(pack(lazy), pack(whole), f"{fmt} {prefix}")


@pytest.mark.parametrize("fmt", ["ct-w8a8", "ct-fp8-block", "ct-w4a16-asym", "awq-g32",
                                 "gptq-4bit-asym", "gptq-8bit-asym"])
def test_each_block_dequantizes_to_the_writers_float64_reference(quantized_checkpoint, fmt):
    ck = quantized_checkpoint(fmt)
    for prefix in ("model.layers.1.self_attn.k_proj.", "model.layers.1.mlp.down_proj."):
        lazy, _ = _both(ck.path, prefix + "weight")
        out, inp = lazy.shape
        reference = ck.reference[prefix]
        # Column parallel halves (rows), row parallel halves (input columns), a quarter.
        for rows, (c0, c1) in [(slice(0, out // 2), (0, inp)), (slice(out // 2, out), (0, inp)),
                               (slice(0, out), (inp // 2, inp)),
                               (slice(out // 4, out // 2), (0, inp // 4))]:
            block = lazy.block(rows, c0, c1, min(lazy.group_size, 32))
            expected = reference[rows, c0:c1]
            np.testing.assert_allclose(block.dequantize(), expected, rtol=2e-7,
                                       atol=2e-7 * np.abs(reference).max(),
                                       err_msg=f"{fmt} {prefix} {rows} {c0}:{c1}")


@pytest.mark.parametrize("fmt", ["ct-w8a8", "ct-w4a16-asym", "gptq-4bit-asym"])
def test_a_fused_weights_parts_stay_unread_and_equal_the_whole_split(quantized_checkpoint, fmt):
    """take_rows (a fused gate_up or qkv split at load; a row reorder): the part is still
    read by slice and packs to what the whole weight's rows pack to. Rows in another order
    (one index per row) are read row by row where each row is its own element, else from
    the whole module and cut (packed zero points span 8 rows)."""
    ck = quantized_checkpoint(fmt)
    lazy, whole = _both(ck.path, "model.layers.0.mlp.gate_proj.weight")  # [256, 128]
    for rows in (slice(0, 128), slice(128, 256), np.r_[128:256, 0:128],
                 np.random.default_rng(0).permutation(256)):
        part = lazy.take_rows(rows)
        assert isinstance(part, QuantSlices) and part.shape == (len(np.arange(256)[rows]), 128)
        _check_packed_slices(pack(part), pack(whole.take_rows(rows)), f"{fmt} {rows}")


def _module_bytes(path, prefix) -> int:
    stored = read_safetensors(path / "model.safetensors")
    return sum(t.nbytes for n, t in stored.items() if n.startswith(prefix))


@pytest.mark.parametrize("fmt", ["ct-w8a8", "ct-fp8-channel", "ct-w4a16-asym", "awq-g32",
                                 "gptq-4bit-asym"])
@pytest.mark.parametrize("axis", [0, 1], ids=["column-parallel", "row-parallel"])
def test_a_host_holding_a_quarter_reads_a_quarter(quantized_checkpoint, fmt, axis):
    """One host of four: the devices of the first quarter of the model axis. Its reads are
    a quarter of the module's stored bytes (plus its share of scales), where a whole read
    takes all of them."""
    ck = quantized_checkpoint(fmt)
    prefix = "model.layers.0.mlp.up_proj."  # [256, 128]: 16 row tiles, 128 inputs
    stored = _module_bytes(ck.path, prefix)
    lazy, _ = _both(ck.path, prefix + "weight")
    packed = pack(lazy)
    parts = [getattr(packed, name) for name in ARRAYS if getattr(packed, name) is not None]
    _, nbytes = _reads(lambda: [p[_even_indices(p.shape, axis, 4)[0]] for p in parts])
    assert nbytes <= stored / 4 * 1.15 + 16, (fmt, nbytes, stored)
    assert nbytes >= stored / 4 * 0.9, (fmt, nbytes, stored)
    again = pack(_both(ck.path, prefix + "weight")[0])
    _, whole = _reads(lambda: [np.asarray(getattr(again, n)) for n in ARRAYS
                               if getattr(again, n) is not None])
    assert whole >= stored * 0.95  # read whole, it is all read


def fmt_has_g_idx(path, prefix) -> bool:
    return prefix + "g_idx" in read_safetensors(path / "model.safetensors")


def test_placement_over_a_mesh_places_the_whole_packing(quantized_checkpoint):
    """place() (what build_engine runs) of a packed weight not read yet, split either way
    over the model axis of 4 devices (and replicated over 2 data rows): the arrays the whole
    weight's packing places, each checkpoint byte of the module read once."""
    ck = quantized_checkpoint("gptq-4bit-asym")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    prefix = "model.layers.0.self_attn.o_proj."
    for spec in (PartitionSpec("model", None, None), PartitionSpec(None, "model", None)):
        lazy, whole = _both(ck.path, prefix + "weight")
        lazy_packed, whole_packed = pack(lazy), pack(whole)
        placed, nbytes = _reads(lambda: {n: place(getattr(lazy_packed, n), NamedSharding(mesh, spec))
                                         for n in ARRAYS})
        for name, array in placed.items():
            np.testing.assert_array_equal(np.asarray(array), getattr(whole_packed, name))
            assert array.sharding.spec == spec
        g_idx = 4 * lazy.shape[1] if fmt_has_g_idx(ck.path, prefix) else 0
        assert nbytes == _module_bytes(ck.path, prefix) - g_idx  # g_idx: checked whole


# --------------------------------------------------------------------------- GGUF

GGUF_DIMS = dict(num_layers=1, hidden=512, ffn=512, heads=4, kv_heads=2, vocab=64)
GGUF_TYPES = {"attn_q": gguf.GGMLQuantizationType.Q4_K, "attn_k": gguf.GGMLQuantizationType.Q8_0,
              "attn_v": gguf.GGMLQuantizationType.Q4_0, "attn_output": gguf.GGMLQuantizationType.Q6_K,
              "ffn_gate": gguf.GGMLQuantizationType.Q5_K, "ffn_up": gguf.GGMLQuantizationType.Q4_1,
              "ffn_down": gguf.GGMLQuantizationType.Q2_K}


@pytest.fixture(scope="module")
def block_gguf(tmp_path_factory):
    """A one-layer Llama GGUF whose projections take seven block types (q and k in llama.cpp's
    rope row order, which the HF names undo by a row gather)."""
    stored = {}
    for i, (name, shape) in enumerate(llama_shapes(**GGUF_DIMS).items()):
        kind = name.split(".")[2] if name.startswith("blk.") else None
        qtype = GGUF_TYPES.get(kind, gguf.GGMLQuantizationType.F32)
        data = (blocks_for(qtype, *shape, seed=i) if len(shape) == 2 and qtype in GGUF_TYPES.values()
                else random_values(shape, seed=i))
        stored[name] = (data, qtype)
    path = tmp_path_factory.mktemp("gguf-blocks") / "llama.gguf"
    write_gguf(path, stored, llama_metadata(**GGUF_DIMS))
    return path


HF_PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.mark.parametrize("module", HF_PROJECTIONS)
def test_gguf_blocks_by_slice_equal_the_whole_and_gguf_dequantize(block_gguf, module):
    name = f"model.layers.0.{module}.weight"
    lazy, whole = _both(block_gguf, name)
    _check_packed_slices(pack(lazy), pack(whole), name)
    # The float64 reference: the gguf package's own dequantization of the HF-ordered rows.
    _, hf = load_checkpoint(block_gguf)
    reference = hf[name].astype(np.float64)
    out, inp = lazy.shape
    for rows, (c0, c1) in [(slice(0, out // 2), (0, inp)), (slice(out // 2, out), (0, inp)),
                           (slice(0, out), (inp // 2, inp))]:
        block = lazy.block(rows, c0, c1, min(lazy.group_size, 32))
        np.testing.assert_allclose(block.dequantize(np.float32), reference[rows, c0:c1],
                                   rtol=1e-6, atol=1e-6 * np.abs(reference).max())


@pytest.mark.parametrize("module", ["self_attn.q_proj", "mlp.down_proj"])
def test_a_gguf_host_holding_half_reads_half(block_gguf, module):
    name = f"model.layers.0.{module}.weight"
    _, hf = load_checkpoint(block_gguf)
    raw = hf.raw(name)
    lazy, _ = _both(block_gguf, name)
    packed = pack(lazy)
    parts = [getattr(packed, n) for n in ARRAYS if getattr(packed, n) is not None]
    for axis in (0, 1):
        _, nbytes = _reads(lambda: [p[_even_indices(p.shape, axis, 2)[0]] for p in parts])
        # values, scales and offsets share one read of the half's blocks
        assert raw.data.nbytes / 2 * 0.95 <= nbytes <= raw.data.nbytes / 2 * 1.05, (axis, nbytes)


def test_a_quantized_model_loaded_by_slices_places_what_a_whole_read_does(quantized_checkpoint):
    """runner/build's load + build_engine on TP 4, from a GPTQ checkpoint: with reads_slices
    every placed array (values, scales and offsets as float32 rather than float16: compared
    by value) equals the whole read's, and the projections' bytes are read at placement."""
    from xla_inference.parallel.sharding import build_mesh
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    ck = quantized_checkpoint("gptq-4bit-asym")
    precision = Precision.uniform(jnp.float32)
    cfg = EngineConfig(num_blocks=16, block_size=4, max_num_tokens=16, max_num_seqs=4,
                       max_model_len=32)

    def placed(reads_slices):
        model = load(ck.path, precision, reads_slices=reads_slices)
        unread = model.unread_bytes
        return build_engine(model, cfg, mesh=build_mesh(4)).params, unread

    (sliced, unread), nbytes = _reads(lambda: placed(True))
    (whole, none_unread), _ = _reads(lambda: placed(False))
    assert none_unread == 0 and unread > 0
    stored = read_safetensors(ck.path / "model.safetensors")
    # Each byte once; g_idx (checked whole by every host, not counted) aside.
    g_idx = sum(t.nbytes for n, t in stored.items() if n.endswith("g_idx"))
    assert nbytes == sum(t.nbytes for t in stored.values()) - g_idx
    sliced_leaves, whole_leaves = jax.tree.leaves(sliced), jax.tree.leaves(whole)
    assert len(sliced_leaves) == len(whole_leaves)
    for a, b in zip(sliced_leaves, whole_leaves):
        assert a.shape == b.shape and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_gguf_model_loaded_by_blocks_places_what_a_whole_read_does(block_gguf):
    """load + build_engine at TP 2 from the seven-type GGUF: every placed array equals the
    whole read's (by value), and the projections' blocks are read at placement (the
    float tensors, dequantized on access, are not counted as file reads)."""
    from xla_inference.parallel.sharding import build_mesh
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    cfg = EngineConfig(num_blocks=16, block_size=4, max_num_tokens=16, max_num_seqs=4,
                       max_model_len=32)

    def placed(reads_slices):
        model = load(block_gguf, Precision.uniform(jnp.float32), reads_slices=reads_slices)
        return build_engine(model, cfg, mesh=build_mesh(2)).params

    sliced, nbytes = _reads(lambda: placed(True))
    whole = placed(False)
    _, hf = load_checkpoint(block_gguf)
    blocks = sum(hf.raw(f"model.layers.0.{m}.weight").data.nbytes for m in HF_PROJECTIONS)
    probes = sum(hf.raw(f"model.layers.0.{m}.weight").data[0].nbytes for m in HF_PROJECTIONS)
    assert nbytes == blocks + probes  # each block once, and each weight's probe row
    for a, b in zip(jax.tree.leaves(sliced), jax.tree.leaves(whole), strict=True):
        assert a.shape == b.shape and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
