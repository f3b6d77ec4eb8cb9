"""An FP8 KV cache (vLLM's --kv-cache-dtype fp8 / fp8_e4m3 / fp8_e5m2), kernels and engine.

Kernels: K/V are written as value / scale saturated to the format's largest finite value,
and read back as float32 times the scale. The reference rounds the same K/V through fp8
with ml_dtypes (numpy), independently of JAX and of the native kernel, and attends in
float64; the written cache bytes must equal ml_dtypes' bit for bit. Both kernels run: the
plain-jnp paths and the native CPU kernel (which widens fp8 rows itself, by bit operations:
every finite fp8 value, subnormals included, is read back exactly).

Engine: a tiny random Llama with an fp8 cache decodes greedily as it does with a float32
cache, and its cache arrays take a quarter of float32's bytes.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tests.kernels.test_ragged_paged_attention import (BLOCK_SIZE, HEAD_DIM, MIXED,
                                                       NUM_BLOCKS, _dense_reference,
                                                       _make_batch, _slots, _step_inputs)
from xla_inference.kernels import cpu_attention
from xla_inference.kernels.ragged_paged_attention import (ragged_paged_attention, write_cache,
                                                          write_kv)

FP8 = {"e4m3": (jnp.float8_e4m3fn, ml_dtypes.float8_e4m3fn),
       "e5m2": (jnp.float8_e5m2, ml_dtypes.float8_e5m2)}
# Not powers of two, so that a scale applied the wrong way round (or twice) shows.
K_SCALE, V_SCALE = 0.37, 1.7


def _quantize(x, np_dtype, scale):
    """numpy's fp8 of x / scale, saturated (the reference for the cache write)."""
    limit = float(ml_dtypes.finfo(np_dtype).max)
    return np.clip(np.asarray(x, np.float32) / np.float32(scale), -limit, limit).astype(np_dtype)


def _dequantize(x, scale):
    return x.astype(np.float64) * np.float64(np.float32(scale))


def _native(path: str) -> bool:
    if path == "native":
        assert cpu_attention.available(), "the native CPU attention kernel did not build"
    return path == "native"


_STATIC = ("scale", "sliding_window", "soft_cap", "native", "k_scale", "v_scale")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _step(k_cache, v_cache, k_new, v_new, slot_mapping, q, seq_ids, positions, block_tables,
          *, scale, sliding_window, soft_cap, native, k_scale, v_scale):
    k_cache, v_cache = write_kv(k_cache, v_cache, k_new, v_new, slot_mapping, k_scale, v_scale)
    out = ragged_paged_attention(q, k_cache, v_cache, seq_ids, positions, block_tables,
                                 block_size=BLOCK_SIZE, scale=scale,
                                 sliding_window=sliding_window, soft_cap=soft_cap,
                                 native=native, k_scale=k_scale, v_scale=v_scale)
    return k_cache, v_cache, out


def _context_cache(rng, seqs, block_tables, key, np_dtype, scale):
    """An fp8 cache (through numpy) of garbage holding each sequence's earlier context."""
    shape = (NUM_BLOCKS * BLOCK_SIZE, *seqs[0][key].shape[1:])
    cache = 100 * rng.standard_normal(shape)
    for seq in seqs:
        pos = np.arange(seq["num_cached"])
        cache[_slots(block_tables[seq["row"]], pos)] = seq[key][pos]
    return _quantize(cache, np_dtype, scale)


# A soft cap always takes the jnp kernel: the native one has no such case to test.
@pytest.mark.parametrize("path,window,soft_cap", [
    ("jnp", None, None), ("jnp", 37, None), ("jnp", None, 30.0),
    ("native", None, None), ("native", 37, None)],
    ids=["jnp-full", "jnp-window", "jnp-soft_cap", "native-full", "native-window"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_cache_matches_float64(path, fmt, window, soft_cap):
    """A ragged step (decode, prefill, chunked prefill, prefix hit) over an fp8 cache: the
    bytes written, and the attention against float64 over the fp8-rounded K/V. With e4m3
    some keys are 1000 times larger, past its range: they saturate (a cast would give NaN).
    (e5m2's range is too wide for that to leave float32 scores precise enough to compare:
    test_write_saturates_to_the_largest_finite_value covers it.)"""
    jnp_dtype, np_dtype = FP8[fmt]
    rng = np.random.default_rng(7)
    num_heads, num_kv_heads = 8, 2
    seqs, block_tables, _ = _make_batch(rng, MIXED, num_heads=num_heads,
                                        num_kv_heads=num_kv_heads, dtype=jnp.float32)
    for seq in seqs:
        seq["k"] = seq["k"] * 3
        big = rng.random(seq["k"].shape) < 0.01
        seq["k"][big] *= 1000 if fmt == "e4m3" else 1
    q, k_new, v_new, seq_ids, positions, slot_mapping = _step_inputs(
        rng, seqs, block_tables, num_heads=num_heads, num_kv_heads=num_kv_heads,
        dtype=jnp.float32)
    k_cache = _context_cache(rng, seqs, block_tables, "k", np_dtype, K_SCALE)
    v_cache = _context_cache(rng, seqs, block_tables, "v", np_dtype, V_SCALE)
    scale = HEAD_DIM ** -0.5
    k_cache, v_cache, out = _step(
        jnp.asarray(k_cache), jnp.asarray(v_cache), jnp.asarray(k_new, jnp.float32),
        jnp.asarray(v_new, jnp.float32), slot_mapping, jnp.asarray(q, jnp.float32), seq_ids,
        positions, block_tables, scale=scale, sliding_window=window, soft_cap=soft_cap,
        native=_native(path), k_scale=K_SCALE, v_scale=V_SCALE)
    assert k_cache.dtype == jnp_dtype and v_cache.dtype == jnp_dtype
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all()
    k_cache, v_cache = np.asarray(k_cache), np.asarray(v_cache)
    for seq in seqs:
        slots = _slots(block_tables[seq["row"]], np.arange(seq["num_cached"] + seq["num_new"]))
        k_fp8, v_fp8 = _quantize(seq["k"], np_dtype, K_SCALE), _quantize(seq["v"], np_dtype, V_SCALE)
        np.testing.assert_array_equal(k_cache[slots].view(np.uint8), k_fp8.view(np.uint8))
        np.testing.assert_array_equal(v_cache[slots].view(np.uint8), v_fp8.view(np.uint8))
        tokens = seq["tokens"]
        expected = _dense_reference(q[tokens], _dequantize(k_fp8, K_SCALE),
                                    _dequantize(v_fp8, V_SCALE), positions[tokens], scale=scale,
                                    sliding_window=window, soft_cap=soft_cap)
        np.testing.assert_allclose(out[tokens], expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_write_saturates_to_the_largest_finite_value(fmt):
    """Values past the format's range (after the scale) are stored as its largest finite
    value, with their sign, as vLLM's CUDA cache write does; infinities too."""
    jnp_dtype, np_dtype = FP8[fmt]
    largest = float(ml_dtypes.finfo(np_dtype).max)
    new = np.asarray([largest * K_SCALE * 1.2, -1e30, np.inf, -np.inf, 1.0], np.float32)
    cache = write_cache(jnp.zeros((8, 1, 5), jnp_dtype), jnp.asarray(new[None, None]),
                        jnp.asarray([3], jnp.int32), K_SCALE)
    got = np.asarray(cache[3, 0]).astype(np.float32)
    np.testing.assert_array_equal(got[:4], [largest, -largest, largest, -largest])
    assert got[4] == np.float32(np.float32(1.0) / np.float32(K_SCALE)).astype(np_dtype)


def _every_finite_value(np_dtype, row_shape) -> np.ndarray:
    """The 256 byte patterns as fp8 rows [n, *row_shape] (NaN and infinity patterns, and
    the padding of the last row, 0)."""
    values = np.arange(256, dtype=np.uint8).view(np_dtype)
    values = np.where(np.isfinite(values.astype(np.float32)), values, np_dtype(0))
    width = int(np.prod(row_shape))
    values = np.concatenate([values, np.zeros(-len(values) % width, np_dtype)])
    return values.reshape(-1, *row_shape)


@pytest.mark.parametrize("path", ["jnp", "native"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("row_shape", [(2, 128), (1, 7)], ids=["rows_of_256", "rows_of_7"])
def test_every_fp8_value_reads_back_exactly(path, fmt, row_shape):
    """Every finite fp8 value (subnormals and -0 too) as values of keys [K, H]: a token that
    sees only one such key gets its row back exactly, times v_scale (a power of two, so
    exact too); each key is a sequence of its own read by a lone decode token, and the
    first is also read by a tile of two tokens (the native kernel's two paths). The native
    kernel widens 8 values at a time by the CPU's half conversion where it has one, the
    rest by bit operations: rows of 7 values take the latter only."""
    jnp_dtype, np_dtype = FP8[fmt]
    rows = _every_finite_value(np_dtype, row_shape)
    num_keys = len(rows)
    cache = np.zeros(((num_keys + 2) * BLOCK_SIZE, *row_shape), np_dtype)
    cache[BLOCK_SIZE * np.arange(1, num_keys + 1)] = rows  # key r: slot 0 of page r + 1
    page = num_keys + 1  # the tile's sequence: row 0 at positions 0 and 1
    cache[page * BLOCK_SIZE:page * BLOCK_SIZE + 2] = rows[0]
    tables = np.arange(1, num_keys + 2, dtype=np.int32)[:, None]
    seq_ids = np.concatenate([np.arange(num_keys), [num_keys, num_keys]]).astype(np.int32)
    positions = np.asarray([0] * num_keys + [0, 1], np.int32)
    num_kv_heads, head_dim = row_shape
    q = np.random.default_rng(0).standard_normal((len(seq_ids), 2 * num_kv_heads, head_dim))
    out = ragged_paged_attention(jnp.asarray(q, jnp.float32), jnp.zeros(cache.shape, jnp_dtype),
                                 jnp.asarray(cache), jnp.asarray(seq_ids),
                                 jnp.asarray(positions), jnp.asarray(tables),
                                 block_size=BLOCK_SIZE, scale=0.1, native=_native(path),
                                 k_scale=0.3, v_scale=2.0)
    # Query heads 2j and 2j + 1 read kv head j.
    expected = np.repeat(rows.astype(np.float32) * 2.0, 2, axis=1)
    np.testing.assert_array_equal(np.asarray(out[:num_keys]), expected)
    np.testing.assert_array_equal(np.asarray(out[num_keys:]), expected[[0, 0]])


def test_float_cache_ignores_scales():
    """A float32 cache stores and reads values as they are, whatever the scales (vLLM sets
    them to 1.0 for an unquantized cache)."""
    rng = np.random.default_rng(3)
    cache = jnp.zeros((4 * BLOCK_SIZE, 2, HEAD_DIM), jnp.float32)
    new = jnp.asarray(rng.standard_normal((5, 2, HEAD_DIM)), jnp.float32)
    slots = jnp.arange(BLOCK_SIZE, BLOCK_SIZE + 5, dtype=jnp.int32)
    written = write_cache(cache, new, slots, 0.25)
    np.testing.assert_array_equal(np.asarray(written[slots]), np.asarray(new))
    q = jnp.asarray(rng.standard_normal((5, 4, HEAD_DIM)), jnp.float32)
    args = (q, written, written, jnp.zeros(5, jnp.int32), jnp.arange(5, dtype=jnp.int32),
            jnp.asarray([[1]], jnp.int32))
    plain = ragged_paged_attention(*args, block_size=BLOCK_SIZE, scale=0.2)
    scaled = ragged_paged_attention(*args, block_size=BLOCK_SIZE, scale=0.2, k_scale=0.25,
                                    v_scale=3.0)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(scaled))


def test_fp8_shared_kv_latent_cache():
    """MLA's latent cache in fp8: one array, its rows both key and value, read with k_scale
    (the jnp kernel; the native one does not take shared K/V)."""
    _, np_dtype = FP8["e4m3"]
    rng = np.random.default_rng(11)
    width, num_heads, length = 48, 4, 40
    latent = rng.standard_normal((length, 1, width)) * 2
    tables = np.asarray([[3, 1, 2]], np.int32)
    slots = _slots(tables[0], np.arange(length))
    cache = jnp.zeros((4 * BLOCK_SIZE, 1, width), jnp.float8_e4m3fn)
    cache = write_cache(cache, jnp.asarray(latent, jnp.float32), jnp.asarray(slots), K_SCALE)
    q = rng.standard_normal((length, num_heads, width))
    positions = np.arange(length, dtype=np.int32)
    out = ragged_paged_attention(jnp.asarray(q, jnp.float32), cache, None,
                                 jnp.zeros(length, jnp.int32), jnp.asarray(positions),
                                 jnp.asarray(tables), block_size=BLOCK_SIZE, scale=0.15,
                                 shared_kv=True, k_scale=K_SCALE)
    fp8 = _quantize(latent, np_dtype, K_SCALE)
    np.testing.assert_array_equal(np.asarray(cache)[slots].view(np.uint8), fp8.view(np.uint8))
    rows = _dequantize(fp8, K_SCALE)
    expected = _dense_reference(q, rows, rows, positions, scale=0.15, sliding_window=None,
                                soft_cap=None)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------
# The engine with an fp8 KV cache


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tests.helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("fp8_kv") / "llama")


def _engine(model_dir, kv_cache_dtype: str, auto_kv=jnp.float32, mesh=None):
    """tests/helpers.tiny_engine's float32 engine, with vLLM's kv_cache_dtype (auto: a
    cache of auto_kv), on one device or over `mesh`."""
    from tests.helpers import ENGINE_BLOCK
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    f32 = jnp.dtype(jnp.float32)
    model = load(model_dir, Precision(f32, f32, jnp.dtype(auto_kv)).with_kv_cache(kv_cache_dtype))
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=64,
                        max_num_seqs=8, max_model_len=128)
    return model, build_engine(model, ecfg, mesh=mesh)


def _greedy(engine, prompts, num_new):
    """Greedy continuations (prompts prefilled in one step, then a decode step per token)
    and the logits of every step [num_new, len(prompts), V]."""
    from tests.helpers import engine_request

    reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(prompts)]
    steps = []
    for _ in range(num_new):
        scheduled = [(r, len(r.token_ids) - r.num_computed_tokens) for r in reqs]
        logits = np.asarray(engine.forward(scheduled).logits)[:len(reqs)]
        steps.append(logits)
        for (req, n), row in zip(scheduled, logits):
            req.num_computed_tokens += n
            req.token_ids.append(int(row.argmax()))
    return [r.output_ids for r in reqs], np.stack(steps)


def _kv_bytes(engine) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(engine.kv_cache))


def test_engine_with_fp8_kv_cache(tiny_llama):
    """vLLM's fp8 (e4m3) cache: the same greedy tokens as the float32 cache for 12 steps
    of three prompts, logits close but not equal (the cache really holds fp8), a quarter
    of the cache bytes; fp8_e5m2 (two mantissa bits): close logits after the prefill."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 11, 17)]
    _, f32_engine = _engine(tiny_llama, "auto")
    want, want_logits = _greedy(f32_engine, prompts, 12)
    model, e4m3 = _engine(tiny_llama, "fp8")
    assert {a.dtype for a in jax.tree.leaves(e4m3.kv_cache)} == {jnp.dtype(jnp.float8_e4m3fn)}
    assert _kv_bytes(e4m3) * 4 == _kv_bytes(f32_engine)
    assert model.kv_page_bytes(16) * 4 == 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, f32
    got, logits = _greedy(e4m3, prompts, 12)
    assert got == want
    diff = np.abs(logits - want_logits).max()
    assert 0 < diff < 0.03, diff
    _, e5m2 = _engine(tiny_llama, "fp8_e5m2")
    assert {a.dtype for a in jax.tree.leaves(e5m2.kv_cache)} == {jnp.dtype(jnp.float8_e5m2)}
    got, logits = _greedy(e5m2, prompts, 1)
    assert got == [w[:1] for w in want]
    assert 0 < np.abs(logits[0] - want_logits[0]).max() < 0.1


def test_fp8_kv_cache_is_half_of_bfloat16(tiny_llama):
    """The cache arrays of an fp8 engine hold half the bytes of a bfloat16 one (the cache
    an accelerator keeps with kv_cache_dtype auto and dtype bfloat16), whatever the
    activations' dtype."""
    from xla_inference.runner.build import Precision

    _, bf16_engine = _engine(tiny_llama, "auto", auto_kv=jnp.bfloat16)
    _, fp8_engine = _engine(tiny_llama, "fp8", auto_kv=jnp.bfloat16)
    assert _kv_bytes(bf16_engine) == 2 * _kv_bytes(fp8_engine)
    bf16 = Precision.uniform(jnp.bfloat16)
    assert bf16.with_kv_cache("auto") == bf16
    for name, dtype in [("fp8", jnp.float8_e4m3fn), ("fp8_e4m3", jnp.float8_e4m3fn),
                        ("fp8_e5m2", jnp.float8_e5m2)]:
        fp8 = bf16.with_kv_cache(name)
        assert fp8.kv_cache == jnp.dtype(dtype) and fp8.weights == bf16.weights
        assert fp8.kv_cache.itemsize * 2 == bf16.kv_cache.itemsize
    with pytest.raises(ValueError, match="fp8_e5m2"):
        bf16.with_kv_cache("int8_per_token_head")


def test_engine_with_fp8_latent_cache(tmp_path):
    """MLA (a tiny DeepSeek-V3): the one latent cache per layer in fp8, a quarter of the
    bytes, the same first greedy tokens as with the float32 cache. (This random model's
    logits lie close together, so later tokens may flip; the kernel's shared-K/V fp8
    arithmetic is checked exactly above.)"""
    from tests.models.test_deepseek_v3 import save_tiny_deepseek_v3

    model_dir = save_tiny_deepseek_v3(tmp_path / "deepseek_v3")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 11, 17)]
    _, f32_engine = _engine(model_dir, "auto")
    _, fp8_engine = _engine(model_dir, "fp8")
    assert {a.dtype for a in jax.tree.leaves(fp8_engine.kv_cache)} == {
        jnp.dtype(jnp.float8_e4m3fn)}
    assert _kv_bytes(fp8_engine) * 4 == _kv_bytes(f32_engine)
    want, _ = _greedy(f32_engine, prompts, 4)
    got, _ = _greedy(fp8_engine, prompts, 4)
    assert got == want


@pytest.mark.parametrize("tp,dp", [(2, 1), (2, 2)], ids=["tp2", "dp2_tp2"])
def test_fp8_kv_cache_sharded_equals_one_device(tiny_llama, tp, dp):
    """Tensor parallel (the fp8 cache split by kv heads) and data parallel replicas give the
    one-device fp8 engine's greedy tokens and logits."""
    from xla_inference.parallel.sharding import build_mesh

    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (7, 13)]
    _, single = _engine(tiny_llama, "fp8")
    _, sharded = _engine(tiny_llama, "fp8", mesh=build_mesh(tp, data_parallel_size=dp))
    assert {a.dtype for a in jax.tree.leaves(sharded.kv_cache)} == {jnp.dtype(jnp.float8_e4m3fn)}
    want, want_logits = _greedy(single, prompts, 6)
    got, logits = _greedy(sharded, prompts, 6)
    assert got == want
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)


def test_layer_kv_cache_scales_are_used_by_fp8_only(tiny_llama):
    """A layer's k_scale / v_scale parameters (SelfAttention; vLLM's checkpoint scales):
    with an fp8 cache, scales of 2 change only the rounding of subnormals (a power of two
    commutes with fp8 rounding elsewhere): well within fp8's own error; scales of 1e4 push
    most keys and values below fp8's smallest subnormal and change the logits far more; a
    float32 cache ignores them (vLLM forces 1.0 for an unquantized cache)."""
    import dataclasses

    from tests.helpers import ENGINE_BLOCK
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    def logits_with_scales(kv_cache_dtype, scale):
        f32 = jnp.dtype(jnp.float32)
        model = load(tiny_llama, Precision(f32, f32, f32).with_kv_cache(kv_cache_dtype))
        if scale is not None:
            model.params.layers = [
                dataclasses.replace(layer, attn=dataclasses.replace(
                    layer.attn, k_scale=np.float32(scale), v_scale=np.float32(scale)))
                for layer in model.params.layers]
        engine = build_engine(model, EngineConfig(
            num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=64, max_num_seqs=8,
            max_model_len=128))
        return _greedy(engine, [[5, 9, 14, 3, 77, 21, 40]], 1)[1]  # the prefill's logits

    fp8, f32 = logits_with_scales("fp8", None), logits_with_scales("auto", None)
    fp8_error = np.abs(fp8 - f32).max()
    assert np.abs(logits_with_scales("fp8", 2.0) - fp8).max() < fp8_error / 2
    assert np.abs(logits_with_scales("fp8", 1e4) - fp8).max() > 5 * fp8_error
    np.testing.assert_array_equal(logits_with_scales("auto", 1e4), f32)
