"""The Pallas grouped matmul (kernels/pallas_gmm.py), TPU and GPU kernels in interpret
mode on the CPU, against the dense float64 product of each group's rows with its weights
(dense experts, and quantized ones dequantized in the kernel); and both kernels lowered for
their device (Mosaic for the TPU, Triton for the GPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from tests.helpers import pallas_interpret
from xla_inference.kernels.pallas_gmm import (FIRST, HAS_GROUP, VALID, Tiling, gmm,
                                              gmm_quantized, group_metadata)

# Small blocks: several row and K tiles (and N tiles on the GPU) in small shapes. The TPU
# interpreter pays per grid point, so its N is one tile.
TILING = {"tpu": Tiling(tm=16, tk=16, tn=48), "gpu": Tiling(tm=16, tk=16, tn=16)}

# Group sizes (rows past their sum must come out zero): empty groups first, between and
# last; one group spanning three row tiles; tiles holding four groups; M not a multiple
# of the tile; every row in one group; no rows at all in any group.
CASES = {
    "ragged-with-empty": ([0, 5, 0, 20, 3, 0, 9, 0], 37),
    "group-spans-tiles": ([2, 40, 1, 0, 0, 0, 0, 3], 50),
    "many-per-tile": ([1, 2, 3, 4, 5, 6, 7, 8], 36),
    "one-group": ([0, 0, 0, 33, 0, 0, 0, 0], 33),
    "rows-past-groups": ([3, 0, 4, 0, 0, 0, 0, 0], 21),
    "no-rows": ([0] * 8, 5),
}


def _reference(x, w, group_sizes) -> np.ndarray:
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for e, size in enumerate(group_sizes):
        rows = slice(start, start + size)
        out[rows] = np.asarray(x[rows], np.float64) @ np.asarray(w[e], np.float64)
        start += size
    return out


def _operands(seed, m, k, n, num_groups, dtype):
    keys = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(keys[1], (num_groups, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    return x, w


def _check(got, x, w, group_sizes, dtype):
    want = _reference(np.asarray(x.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)),
                      group_sizes)
    assert got.dtype == dtype and got.shape == want.shape
    # bfloat16: the inputs are exact, the float32 sum is rounded once to 8 bits.
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)


# Interpret mode is slow (a TPU call: seconds): one case per backend in the fast set.
FAST = {("tpu", "ragged-with-empty", "f32"), ("gpu", "group-spans-tiles", "bf16")}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _matrix():
    for backend in ("tpu", "gpu"):
        for case in CASES:
            for name, dtype in DTYPES.items():
                if name == "bf16" and case in ("one-group", "rows-past-groups", "no-rows"):
                    continue  # the schedule's edge cases: float32 is enough
                marks = () if (backend, case, name) in FAST else (pytest.mark.slow,)
                yield pytest.param(backend, case, dtype, marks=marks,
                                   id=f"{backend}-{case}-{name}")


@pytest.mark.parametrize("backend,case,dtype", list(_matrix()))
def test_gmm_equals_dense_per_group(backend, case, dtype):
    group_sizes, m = CASES[case]
    x, w = _operands(len(case), m, 32, 48, len(group_sizes), dtype)
    got = gmm(x, w, jnp.asarray(group_sizes, jnp.int32), backend=backend, interpret=pallas_interpret(backend),
              tiling=TILING[backend])
    _check(got, x, w, group_sizes, dtype)


@pytest.mark.parametrize("backend", [pytest.param("tpu", marks=pytest.mark.slow), "gpu"])
def test_default_tiling_and_odd_dimensions(backend):
    """Default blocks; K and N that no block size divides (TPU: whole-dimension blocks; GPU:
    padded to 16), under jit with traced group sizes."""
    group_sizes = [7, 0, 12, 2]
    x, w = _operands(3, 21, 24, 40, 4, jnp.float32)
    run = jax.jit(functools.partial(gmm, backend=backend, interpret=pallas_interpret(backend)))
    _check(run(x, w, jnp.asarray(group_sizes, jnp.int32)), x, w, group_sizes, jnp.float32)


def test_group_metadata_visits_each_overlap_once():
    """The work list against a plain enumeration: every (row tile, non-empty group) that
    overlap, in row order, each exactly once; tiles without group rows once (no group)."""
    rng = np.random.default_rng(0)
    num_groups, tm, tiles = 6, 8, 12  # 96 rows: one compiled metadata
    metadata = jax.jit(functools.partial(group_metadata, row_tiles=tiles, tm=tm))
    for _ in range(30):
        sizes = rng.integers(0, 17, num_groups) * (rng.random(num_groups) < 0.7)
        meta = jax.tree.map(np.asarray, metadata(jnp.asarray(sizes)))
        ends = np.cumsum(sizes)
        want = []
        for t in range(tiles):
            overlapping = [(t, g, True) for g in range(num_groups) if sizes[g]
                           and ends[g] - sizes[g] < (t + 1) * tm and ends[g] > t * tm]
            want += overlapping or [(t, None, False)]
        valid = (meta.item_flags & VALID) != 0
        assert len(meta.item_tile) == tiles + num_groups - 1 >= len(want) == valid.sum()
        assert valid[:len(want)].all()
        got = [(t, g if f & HAS_GROUP else None, bool(f & HAS_GROUP)) for t, g, f in
               zip(meta.item_tile[valid], meta.item_group[valid], meta.item_flags[valid])]
        assert got == want
        first = (meta.item_flags[valid] & FIRST) != 0
        assert list(first) == [i == 0 or want[i - 1][0] != want[i][0] for i in range(len(want))]


def _lowered(f, platform, *args) -> str:
    """The StableHLO of f lowered for `platform` (no such device needed): the Pallas call
    goes through Mosaic's lowering for "tpu" and Triton's for "cuda"."""
    checks = ([export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
              if platform == "cuda" else [])
    return export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(
        *args).mlir_module()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend,platform,call", [
    ("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_lowers_for_its_device(backend, platform, call, dtype):
    x = jax.ShapeDtypeStruct((200, 256), dtype)
    w = jax.ShapeDtypeStruct((8, 256, 512), dtype)
    sizes = jax.ShapeDtypeStruct((8,), jnp.int32)
    assert call in _lowered(functools.partial(gmm, backend=backend), platform, x, w, sizes)


# ------------------------------------------------------------------ quantized experts

def _quantized_experts(kind, num_experts, k, n, group_size, offsets, seed=0):
    """Experts packed by quantization/packed.pack and converted to the kernels' layout,
    with each expert's float64 [K, N] weight."""
    import ml_dtypes

    from xla_inference.kernels.pallas_quantized_matmul import accelerator_layout
    from xla_inference.quantization.groups import GroupQuant
    from xla_inference.quantization.packed import pack

    rng = np.random.default_rng(seed)
    arrays, dense = [], []
    for _ in range(num_experts):
        if kind == "int4":
            values = rng.integers(0, 16, (n, k)).astype(np.uint8)
        elif kind == "int8":
            values = rng.integers(-128, 128, (n, k)).astype(np.int8)
        else:
            values = (rng.standard_normal((n, k)) * 4).astype(ml_dtypes.float8_e4m3fn)
        scales = rng.uniform(0.01, 0.05, (n, k // group_size)).astype(np.float32)
        offs = rng.uniform(-0.2, 0.2, scales.shape).astype(np.float32) if offsets else None
        quant = GroupQuant(values, scales, offs, kind, group_size)
        packed = pack(quant)
        bits = 4 if kind == "int4" else 8
        arrays.append(accelerator_layout(
            jnp.asarray(packed.values), jnp.asarray(packed.scales),
            None if packed.offsets is None else jnp.asarray(packed.offsets), bits=bits,
            in_features=k, out_features=n))
        dense.append(quant.dequantize().T)
    stack = lambda i: None if arrays[0][i] is None else jnp.stack([a[i] for a in arrays])  # noqa: E731
    return (stack(0), stack(1), stack(2)), np.stack(dense), dict(bits=bits,
                                                                group_size=packed.group_size)


QUANTIZED = {"int4-g32-offsets": ("int4", 32, True), "int8-channel": ("int8", 256, False),
             "fp8-channel": ("fp8", 256, False)}


@pytest.mark.parametrize("backend,name", [
    pytest.param("tpu", "int4-g32-offsets", marks=pytest.mark.slow),
    ("tpu", "int8-channel"),
    pytest.param("tpu", "fp8-channel", marks=pytest.mark.slow),
    pytest.param("gpu", "int4-g32-offsets", marks=pytest.mark.slow),
    ("gpu", "int8-channel"),
    pytest.param("gpu", "fp8-channel", marks=pytest.mark.slow)])
def test_gmm_quantized_equals_dense_per_group(backend, name):
    """Experts dequantized tile by tile in the kernel; empty experts, rows past them."""
    group_sizes, k, n = [5, 0, 14, 3], 256, 48
    arrays, dense, args = _quantized_experts(*QUANTIZED[name][:1], 4, k, n,
                                             *QUANTIZED[name][1:])
    x = jax.random.normal(jax.random.key(5), (25, k), jnp.float32)
    tiling = Tiling(16, k if args["bits"] == 4 else 128, n if backend == "tpu" else 16)
    got = gmm_quantized(x, *arrays, jnp.asarray(group_sizes, jnp.int32), **args,
                        backend=backend, interpret=pallas_interpret(backend), tiling=tiling)
    want = _reference(np.asarray(x), dense, group_sizes)
    np.testing.assert_allclose(np.asarray(got, np.float64) / np.abs(want).max(),
                               want / np.abs(want).max(), atol=1e-5)


@pytest.mark.parametrize("backend,platform,call", [
    ("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_gmm_quantized_lowers_for_its_device(backend, platform, call):
    """Serving shapes: 8 experts of 1024 x 1024 4-bit weights in groups of 32, offsets."""
    s = jax.ShapeDtypeStruct
    k = n = 1024
    groups = s((8, k // 32, n), jnp.float16)
    f = functools.partial(gmm_quantized, bits=4, group_size=32, backend=backend)
    assert call in _lowered(f, platform, s((200, k), jnp.bfloat16), s((8, k // 2, n), jnp.uint8),
                            groups, groups, s((8,), jnp.int32))
