"""The Pallas GPU (Triton) ragged paged attention against the float64 reference.

The kernels run in Pallas interpret mode (on this CPU), under the attention tests' own
case builders and checks (tests/kernels/test_ragged_paged_attention.py,
tests/kernels/test_fp8_kv_cache.py): mixed decode / prefill / chunked prefill / prefix
hits, GQA and MHA, sliding window, soft cap, attention chunks, shuffled pages and tokens,
poisoned freed pages, head dims 64 / 128 / 256, bf16 and f32, fp8 caches, and the split-K
decode path over contexts long enough to split. Those checks call the module's step
function (or the kernel) by name; the tests here hand them this kernel instead.

A second set lowers the same calls for CUDA (jax.export, no GPU needed): the Pallas
Triton lowering accepts every load, dot and loop (power-of-two tiles, gathers, fp8
casts), so what runs in interpret mode here is what Triton compiles on a GPU.
benchmarks/gpu_check.sh runs the interpret-mode checks natively on a GPU.
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
from xla_inference.kernels import pallas_gpu_attention
from xla_inference.kernels.ragged_paged_attention import write_kv

# On a GPU (benchmarks/gpu_check.sh sets it) the kernels run natively instead.
INTERPRET = jax.default_backend() != "gpu"
# The jnp kernel's own knobs (its tests pass them); this kernel has its own.
_JNP_KNOBS = ("native", "tile", "decode_chunk", "decode_group")


def _kernel(q, k_cache, v_cache, seq_ids, positions, block_tables, **kw):
    for name in _JNP_KNOBS + ("shared_kv",):
        kw.pop(name, None)
    return pallas_gpu_attention.paged_attention(q, k_cache, v_cache, seq_ids, positions,
                                                block_tables, interpret=INTERPRET, **kw)


# test_ragged_paged_attention's step with this kernel.
_step = rpa_tests.step_with(_kernel)


@functools.partial(jax.jit, static_argnames=fp8_tests._STATIC)
def _fp8_step(k_cache, v_cache, k_new, v_new, slot_mapping, q, seq_ids, positions,
              block_tables, *, scale, sliding_window, soft_cap, native, k_scale, v_scale):
    """test_fp8_kv_cache's _step with this kernel (scales traced, as the engine's are)."""
    del native
    k_cache, v_cache = write_kv(k_cache, v_cache, k_new, v_new, slot_mapping, k_scale, v_scale)
    out = _kernel(q, k_cache, v_cache, seq_ids, positions, block_tables,
                  block_size=BLOCK_SIZE, scale=scale, sliding_window=sliding_window,
                  soft_cap=soft_cap, k_scale=jnp.float32(k_scale),
                  v_scale=jnp.float32(v_scale))
    return k_cache, v_cache, out


def check(seed, specs, **kw):
    _run_and_check(seed, specs, step=_step, **kw)


# ---------------------------------------------------------------------------------------
# Fast set


@pytest.mark.parametrize("num_heads,num_kv_heads", [
    (8, 2), pytest.param(4, 4, marks=pytest.mark.slow)], ids=["gqa", "mha"])
def test_mixed_batch(num_heads, num_kv_heads):
    check(0, MIXED, num_heads=num_heads, num_kv_heads=num_kv_heads)


def test_bfloat16_mixed_batch():
    check(9, MIXED, num_heads=8, num_kv_heads=2, dtype=jnp.bfloat16, tol=1e-2)


def test_window_soft_cap_small_tiles():
    # 16-key chunks and 16-row tiles (4 tokens of G = 4): tiles split every run.
    check(7, MIXED, num_heads=8, num_kv_heads=2, sliding_window=100, soft_cap=3.0,
          kv_chunk=16, tile_rows=16)


@pytest.mark.parametrize("max_splits", [pytest.param(1, marks=pytest.mark.slow), 3, 32])
def test_split_k_decode(max_splits):
    # Contexts up to 301 keys in 16-key chunks: 19 chunks split 1, 3 (uneven) or up to 32
    # ways (more splits than chunks: empty splits must merge away).
    check(32, ALL_DECODE, num_heads=8, num_kv_heads=2, kv_chunk=16, max_splits=max_splits)


@pytest.mark.parametrize("window", [None, pytest.param(37, marks=pytest.mark.slow)])
def test_batch_one_decode(window):
    # T = 1, the batch-1 decode bucket: the decode kernel alone, split 19 ways.
    check(12, [(300, 1)], num_heads=8, num_kv_heads=2, num_tokens=1, kv_chunk=16,
          sliding_window=window)


def test_fp8_e4m3_cache(monkeypatch):
    monkeypatch.setattr(fp8_tests, "_step", _fp8_step)
    fp8_tests.test_fp8_cache_matches_float64("jnp", "e4m3", None, None)


@pytest.mark.parametrize("case", [
    dict(),
    dict(dtype=jnp.float32, head_dim=64, num_heads=4, num_kv_heads=4, sliding_window=40,
         soft_cap=5.0, attention_chunk=32, kv_chunk=16),
    dict(head_dim=256, cache_dtype=jnp.float8_e4m3fn, k_scale=0.5, v_scale=2.0),
    dict(num_tokens=1, cache_dtype=jnp.float8_e5m2, num_heads=64, num_kv_heads=8),
    dict(head_dim=96, num_heads=32, num_kv_heads=32),
    dict(head_dim=8, num_heads=6, num_kv_heads=2, dtype=jnp.float32),
], ids=["llama8b-bf16", "f32-mha-masks", "h256-fp8", "decode1-e5m2-g8", "h96-padded",
        "h8-g3-padded"])
def test_lowers_to_triton_for_cuda(case):
    """The kernels pass Pallas's Triton lowering (tile sizes, gathers, dots, casts):
    exported for CUDA on this CPU; two Triton custom calls (tiles, decode), one for T = 1."""
    case = dict(case)
    num_tokens = case.pop("num_tokens", 64)
    dtype = case.pop("dtype", jnp.bfloat16)
    cache_dtype = case.pop("cache_dtype", dtype)
    head_dim = case.pop("head_dim", 128)
    num_heads, num_kv_heads = case.pop("num_heads", 32), case.pop("num_kv_heads", 8)
    cache = jax.ShapeDtypeStruct((256 * BLOCK_SIZE, num_kv_heads, head_dim), cache_dtype)
    ids = jax.ShapeDtypeStruct((num_tokens,), jnp.int32)
    fn = jax.jit(functools.partial(pallas_gpu_attention.paged_attention,
                                   block_size=BLOCK_SIZE, scale=0.1, **case))
    exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        jax.ShapeDtypeStruct((num_tokens, num_heads, head_dim), dtype), cache, cache, ids,
        ids, jax.ShapeDtypeStruct((8, 64), jnp.int32))
    module = exported.mlir_module()
    assert module.count("xla.gpu.triton") == (1 if num_tokens == 1 else 2)


@pytest.mark.parametrize("kv_chunk", [24, 8])
def test_rejects_what_triton_cannot_tile(kv_chunk):
    q = jnp.zeros((4, 8, 32))
    cache = jnp.zeros((4 * BLOCK_SIZE, 2, 32))
    ids = jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="power of two"):
        pallas_gpu_attention.paged_attention(q, cache, cache, ids, ids,
                                             jnp.zeros((1, 4), jnp.int32),
                                             block_size=BLOCK_SIZE, scale=1.0, interpret=True,
                                             kv_chunk=kv_chunk)


# ---------------------------------------------------------------------------------------
# Slow set: the rest of the matrix


@pytest.mark.slow
@pytest.mark.parametrize("head_dim,dtype,tol", [
    (64, jnp.float32, 1e-5), (128, jnp.bfloat16, 1e-2), (256, jnp.float32, 1e-5),
    (256, jnp.bfloat16, 1e-2), (80, jnp.bfloat16, 1e-2)],
    ids=["64-f32", "128-bf16", "256-f32", "256-bf16", "80-bf16"])
def test_head_dims(monkeypatch, head_dim, dtype, tol):
    monkeypatch.setattr(rpa_tests, "HEAD_DIM", head_dim)
    # kv_chunk=None: the kernel's own chunk for the head dim and dtype, as the engine calls
    # it (float32 rows of 256 at the tests' 64 keys overflow an H200 SM's shared memory).
    check(40 + head_dim, MIXED, num_heads=8, num_kv_heads=2, dtype=dtype, tol=tol,
          kv_chunk=None)


@pytest.mark.slow
@pytest.mark.parametrize("attention_chunk", [40])
def test_chunked_local_attention(attention_chunk):
    check(50 + attention_chunk, MIXED, num_heads=8, num_kv_heads=2,
          attention_chunk=attention_chunk, kv_chunk=16, tile_rows=32)


@pytest.mark.slow
def test_window_and_chunk_and_soft_cap_one_prefill():
    check(34, ONE_PREFILL, num_heads=8, num_kv_heads=2, sliding_window=20, soft_cap=2.0,
          attention_chunk=64, kv_chunk=16, tile_rows=16)


@pytest.mark.slow
def test_shuffled_tokens_overflow_decode_slots_and_tiles():
    # Shuffled, the 69 tokens form ~60 one-token runs: 7 decode slots, the rest one-token
    # tiles, more tiles than tile programs (served grid-stride).
    check(36, MIXED, num_heads=8, num_kv_heads=2, shuffle=True)


@pytest.mark.slow
@pytest.mark.parametrize("pad_row", [0, rpa_tests.NUM_ROWS - 1])
def test_runner_padding(pad_row):
    check(37, MIXED, num_heads=8, num_kv_heads=2, pad_row=pad_row, num_decode_slots=2)


@pytest.mark.slow
def test_all_padding_rows_stay_finite():
    check(11, [], num_heads=8, num_kv_heads=2)


@pytest.mark.slow
@pytest.mark.parametrize("poison", [np.nan, np.inf], ids=["nan", "inf"])
def test_freed_pages_never_reach_the_output(monkeypatch, poison):
    monkeypatch.setattr(rpa_tests, "_step", _step)
    rpa_tests.test_pages_outside_the_window_never_reach_the_output(
        poison, 20, dict(kv_chunk=BLOCK_SIZE, max_splits=4))


@pytest.mark.slow
@pytest.mark.parametrize("fmt,window,soft_cap", [("e4m3", 37, None), ("e5m2", None, 30.0)])
def test_fp8_cache_window_soft_cap(monkeypatch, fmt, window, soft_cap):
    monkeypatch.setattr(fp8_tests, "_step", _fp8_step)
    fp8_tests.test_fp8_cache_matches_float64("jnp", fmt, window, soft_cap)


@pytest.mark.slow
# In interpret mode both formats widen through XLA's convert (test_fp8_kv_cache covers
# e5m2's); on a GPU each format has its own Triton conversion: both run there.
@pytest.mark.parametrize("fmt", ["e4m3"] + ([] if INTERPRET else ["e5m2"]))
def test_every_fp8_value_reads_back_exactly(monkeypatch, fmt):
    monkeypatch.setattr(fp8_tests, "ragged_paged_attention", _kernel)
    fp8_tests.test_every_fp8_value_reads_back_exactly("jnp", fmt, (2, 128))
