"""The Pallas TPU (Mosaic) ragged paged attention against the float64 reference.

The kernel runs in Pallas' TPU interpret mode on this CPU (pltpu.InterpretParams: DMAs,
semaphores and VMEM simulated), under the attention tests' own case builders and checks
(tests/kernels/test_ragged_paged_attention.py, tests/kernels/test_fp8_kv_cache.py):
mixed decode / prefill / chunked prefill / prefix hits, GQA and MHA, sliding window, soft
cap, attention chunks, shuffled pages and tokens, poisoned freed pages, head dims 64 / 128
/ 256 (lane packing of 2 heads at 64, aligned slices at 128 and 256), bf16 and f32, fp8
caches; the KV write fused into the kernel (write_and_attend) in some cases. Those checks
call their module's step function by name; the tests here hand them this kernel instead.
Their kv_chunk (keys per step) becomes this kernel's pages per DMA chunk (kv_chunk /
block_size); `tile` is this kernel's tokens per tile program.

A second set lowers the kernel for TPU with jax.export on this CPU (Pallas -> Mosaic
dialect, serialized into the tpu_custom_call): every primitive the kernel uses has a
Mosaic lowering. Mosaic's own layout passes run inside libtpu and are not checked here.
Interpret mode compiles slowly (5-15 s per case on 2 cores): the fast set holds 3 compiled
cases, the rest of the matrix is marked slow.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import test_fp8_kv_cache as fp8_tests
from tests.kernels import test_ragged_paged_attention as rpa_tests
from tests.kernels.test_ragged_paged_attention import (ALL_DECODE, BLOCK_SIZE, MIXED,
                                                       ONE_PREFILL, _run_and_check)
from xla_inference.kernels import pallas_tpu_attention
from xla_inference.kernels.ragged_paged_attention import write_kv

_JNP_KNOBS = ("native", "decode_chunk", "decode_group", "shared_kv")


def _kernel(q, k_cache, v_cache, seq_ids, positions, block_tables, *, kv_chunk=None,
            auto_plan=False, **kw):
    """This kernel in interpret mode, with the jnp kernel's knobs dropped and its kv_chunk
    read as pages per chunk; auto_plan: the kernel's own choice of tile and chunk."""
    for name in _JNP_KNOBS:
        kw.pop(name, None)
    if kv_chunk is not None:
        kw.setdefault("pages_per_chunk", max(1, kv_chunk // kw["block_size"]))
    if auto_plan:
        kw.pop("tile", None)
        kw.pop("pages_per_chunk", None)
    return pallas_tpu_attention.paged_attention(q, k_cache, v_cache, seq_ids, positions,
                                                block_tables, interpret=True, **kw)


# test_ragged_paged_attention's step with this kernel.
_step = rpa_tests.step_with(_kernel)


def _kernel_knobs(kw, kv_chunk):
    for name in _JNP_KNOBS:
        kw.pop(name, None)
    kw.setdefault("pages_per_chunk", max(1, kv_chunk // BLOCK_SIZE))
    return kw


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "soft_cap",
                                             "kv_chunk", "knobs", "attention_chunk"))
def _fused_step(k_cache, v_cache, k_new, v_new, slot_mapping, q, seq_ids, positions,
                block_tables, *, scale, sliding_window, soft_cap, kv_chunk, knobs=(),
                attention_chunk=None):
    """_step with the KV write inside the kernel (write_and_attend)."""
    return pallas_tpu_attention.write_and_attend(
        q, k_new, v_new, slot_mapping, k_cache, v_cache, seq_ids, positions, block_tables,
        block_size=BLOCK_SIZE, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
        attention_chunk=attention_chunk, interpret=True,
        **_kernel_knobs(dict(knobs), kv_chunk))


@functools.partial(jax.jit, static_argnames=fp8_tests._STATIC)
def _fused_fp8_step(k_cache, v_cache, k_new, v_new, slot_mapping, q, seq_ids, positions,
                    block_tables, *, scale, sliding_window, soft_cap, native, k_scale, v_scale):
    del native
    return pallas_tpu_attention.write_and_attend(
        q, k_new, v_new, slot_mapping, k_cache, v_cache, seq_ids, positions, block_tables,
        block_size=BLOCK_SIZE, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
        k_scale=jnp.float32(k_scale), v_scale=jnp.float32(v_scale), interpret=True,
        pages_per_chunk=2)


@functools.partial(jax.jit, static_argnames=fp8_tests._STATIC)
def _fp8_step(k_cache, v_cache, k_new, v_new, slot_mapping, q, seq_ids, positions,
              block_tables, *, scale, sliding_window, soft_cap, native, k_scale, v_scale):
    """test_fp8_kv_cache's _step with this kernel (scales traced, as a layer's are)."""
    del native
    k_cache, v_cache = write_kv(k_cache, v_cache, k_new, v_new, slot_mapping, k_scale, v_scale)
    out = _kernel(q, k_cache, v_cache, seq_ids, positions, block_tables, kv_chunk=32,
                  block_size=BLOCK_SIZE, scale=scale, sliding_window=sliding_window,
                  soft_cap=soft_cap, k_scale=jnp.float32(k_scale), v_scale=jnp.float32(v_scale))
    return k_cache, v_cache, out


def check(seed, specs, *, head_dim=None, monkeypatch=None, step=_step, **kw):
    if head_dim is not None:
        monkeypatch.setattr(rpa_tests, "HEAD_DIM", head_dim)
    _run_and_check(seed, specs, step=step, **kw)


# ---------------------------------------------------------------------------------------
# Fast set: three compiled cases and the lowering checks


def test_mixed_batch_gqa_head_dim_64_fused_write(monkeypatch):
    # H = 64, K = 2: both kv heads packed into one 128-lane matmul; 2 pages per DMA chunk,
    # tiles of 8 tokens split the longer runs and start mid-chunk. The step's K/V are
    # written by the kernel (write_and_attend): the check reads every sequence back from
    # the returned cache.
    check(0, MIXED, head_dim=64, monkeypatch=monkeypatch, step=_fused_step, num_heads=8,
          num_kv_heads=2, kv_chunk=32, tile=8)


def test_bfloat16_mha_window_soft_cap_shuffled(monkeypatch):
    # H = 128: one kv head per 128-lane slice; tokens in random order (the kernel sorts
    # them); a window shorter than a chunk and a soft cap that bends the scores.
    check(9, MIXED, head_dim=128, monkeypatch=monkeypatch, num_heads=4, num_kv_heads=4,
          dtype=jnp.bfloat16, tol=1e-2, sliding_window=20, soft_cap=3.0, kv_chunk=32,
          shuffle=True)


def test_fp8_e4m3_cache(monkeypatch):
    monkeypatch.setattr(fp8_tests, "_step", _fp8_step)
    fp8_tests.test_fp8_cache_matches_float64("jnp", "e4m3", None, None)


@pytest.fixture
def tpu_lowering(monkeypatch):
    """Pallas asks the default device's kind for the TPU's shape (lanes, sublanes): give
    this CPU a v6e's, so that the kernel can be lowered for TPU here."""
    from jax._src.pallas.mosaic import tpu_info

    monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V6E, 1))


@pytest.mark.parametrize("case", [
    dict(),
    dict(dtype=jnp.float32, head_dim=64, num_heads=4, num_kv_heads=4, sliding_window=40,
         soft_cap=5.0, attention_chunk=32),
    dict(head_dim=256, cache_dtype=jnp.float8_e4m3fn, k_scale=0.5, v_scale=2.0),
    dict(num_tokens=1, cache_dtype=jnp.float8_e5m2, num_heads=64, num_kv_heads=8),
], ids=["llama8b-bf16", "f32-h64-masks", "h256-fp8", "decode1-e5m2-g8"])
def test_lowers_to_mosaic_for_tpu(tpu_lowering, case):
    """Exported for TPU on this CPU: two Mosaic custom calls (decode, tiles)."""
    case = dict(case)
    num_tokens = case.pop("num_tokens", 64)
    dtype = case.pop("dtype", jnp.bfloat16)
    cache_dtype = case.pop("cache_dtype", dtype)
    head_dim = case.pop("head_dim", 128)
    num_heads, num_kv_heads = case.pop("num_heads", 32), case.pop("num_kv_heads", 8)
    cache = jax.ShapeDtypeStruct((256 * BLOCK_SIZE, num_kv_heads, head_dim), cache_dtype)
    ids = jax.ShapeDtypeStruct((num_tokens,), jnp.int32)
    fn = jax.jit(functools.partial(pallas_tpu_attention.paged_attention,
                                   block_size=BLOCK_SIZE, scale=0.1, **case))
    exported = jax.export.export(fn, platforms=["tpu"])(
        jax.ShapeDtypeStruct((num_tokens, num_heads, head_dim), dtype), cache, cache, ids,
        ids, jax.ShapeDtypeStruct((8, 64), jnp.int32))
    assert exported.mlir_module().count("tpu_custom_call") == 2


def test_fused_write_lowers_to_mosaic_for_tpu(tpu_lowering):
    """write_and_attend for TPU: the caches aliased in place (no copy of the cache)."""
    num_tokens, cache_dtype = 32, jnp.float8_e4m3fn
    cache = jax.ShapeDtypeStruct((256 * BLOCK_SIZE, 8, 128), cache_dtype)
    rows = jax.ShapeDtypeStruct((num_tokens, 8, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((num_tokens,), jnp.int32)
    fn = jax.jit(functools.partial(pallas_tpu_attention.write_and_attend,
                                   block_size=BLOCK_SIZE, scale=0.1, k_scale=0.5),
                 donate_argnums=(4, 5))
    exported = jax.export.export(fn, platforms=["tpu"])(
        jax.ShapeDtypeStruct((num_tokens, 32, 128), jnp.bfloat16), rows, rows, ids, cache,
        cache, ids, ids, jax.ShapeDtypeStruct((8, 64), jnp.int32))
    module = exported.mlir_module()
    assert module.count("tpu_custom_call") == 2
    assert "output_operand_alias" in module


def test_shared_kv_is_refused():
    cache = jnp.zeros((4 * BLOCK_SIZE, 1, 32))
    ids = jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="shared K/V"):
        pallas_tpu_attention.paged_attention(jnp.zeros((4, 4, 32)), cache, None, ids, ids,
                                             jnp.zeros((1, 4), jnp.int32),
                                             block_size=BLOCK_SIZE, scale=1.0, interpret=True)


# ---------------------------------------------------------------------------------------
# Slow set: the rest of the matrix. Most cases share the knobs (and so the compiled step)
# of SMALL: 2 pages per chunk, tiles of 8 tokens.

SMALL = dict(num_heads=8, num_kv_heads=2, kv_chunk=32, tile=8)


@pytest.mark.slow
def test_head_dim_256(monkeypatch):
    # With the fast set: 64 (f32, packed), 128 (bf16), 256 (f32, two 128-lane slices).
    check(296, MIXED, head_dim=256, monkeypatch=monkeypatch, num_heads=8,
          num_kv_heads=2)


@pytest.mark.slow
@pytest.mark.parametrize("specs,pad_row,shuffle", [
    (MIXED, 0, False), (MIXED, rpa_tests.NUM_ROWS - 1, False), (ALL_DECODE, 0, True),
    ([], rpa_tests.NUM_ROWS - 1, False), (ONE_PREFILL, 0, False)],
    ids=["pad-row-0", "pad-last-row", "decode-shuffled", "all-padding", "one-prefill"])
def test_padding_and_order(specs, pad_row, shuffle):
    # The runner's padding (row 0, position 0: merged into request 0's run once sorted),
    # padding of a row of its own, decode tokens in random order, a step of padding only.
    check(37, specs, pad_row=pad_row, shuffle=shuffle, **SMALL)


@pytest.mark.slow
def test_window_and_attention_chunk_and_soft_cap():
    # Attention chunks of 40 (no multiple of a page or a DMA chunk) and a window of 20 at
    # once: decode tokens and tiles start past whole chunks of pages.
    check(34, MIXED, num_heads=8, num_kv_heads=2, sliding_window=20, soft_cap=2.0,
          attention_chunk=40, kv_chunk=16, tile=8)


@pytest.mark.slow
@pytest.mark.parametrize("poison", [np.nan, np.inf], ids=["nan", "inf"])
def test_freed_pages_never_reach_the_output(monkeypatch, poison):
    monkeypatch.setattr(rpa_tests, "_step", _step)
    rpa_tests.test_pages_outside_the_window_never_reach_the_output(
        poison, 20, dict(kv_chunk=32, tile=8))


@pytest.mark.slow
def test_fp8_e5m2_cache_soft_cap_fused_write(monkeypatch):
    # The cache bytes written by the kernel equal ml_dtypes' e5m2 of value / v_scale.
    monkeypatch.setattr(fp8_tests, "_step", _fused_fp8_step)
    fp8_tests.test_fp8_cache_matches_float64("jnp", "e5m2", None, 30.0)


@pytest.mark.slow
def test_no_races_between_dma_and_compute(monkeypatch):
    """The interpret mode's race detector over the fused KV write and the double-buffered
    page copies: no access to memory while a DMA into it is in flight. Decode tokens and
    the runner's padding (row 0, position 0: written to the null page, merged into
    request 0's run): the decode call reads the caches the tile call wrote."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    from jax.experimental.pallas import tpu as pltpu

    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager")
    traced = []

    def race_checked(interpret):
        traced.append(interpret)
        return params if interpret else False

    monkeypatch.setattr(pallas_tpu_attention, "_interpret_params", race_checked)
    jax.clear_caches()  # a new trace of the step, with these parameters
    check(13, ALL_DECODE, pad_row=0, step=_fused_step, **SMALL)
    jax.clear_caches()
    assert traced == [True, True]  # both calls (tiles, decode) ran under the detector
    assert ipc.races is not None and not ipc.races.races_found
