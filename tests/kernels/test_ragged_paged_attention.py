"""ragged_paged_attention and write_kv against a naive dense per-sequence attention.

The reference never looks at pages: it attends over each sequence's own unpaged K/V in
float64. The kernel sees the same K/V only through the paged cache, which the test fills by
hand (context cached in earlier steps) and through write_kv (this step's tokens).

Every check runs twice: on the plain-jnp paths, and with the native CPU kernel
(kernels/cpu_attention.py) wherever it can serve the call.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xla_inference.kernels import cpu_attention
from xla_inference.kernels.ragged_paged_attention import ragged_paged_attention, write_kv

BLOCK_SIZE = 16
NUM_BLOCKS = 64
MAX_BLOCKS = 24
NUM_ROWS = 6
NUM_TOKENS = 96  # padded T
HEAD_DIM = 32

# (cached tokens, new tokens) per sequence.
MIXED = [
    (300, 1),   # decode with a long context (> kv_chunk, not a block multiple)
    (0, 37),    # full prefill
    (50, 20),   # chunked prefill: second chunk starts mid-block
    (64, 5),    # prefix-cache hit: block-aligned cached prefix, several new tokens
    (129, 1),   # decode just past a chunk boundary
]
ALL_DECODE = [(17, 1), (255, 1), (0, 1), (140, 1), (300, 1), (31, 1)]
ONE_PREFILL = [(0, 90)]


_PATH = {"native": False}


@pytest.fixture(autouse=True, params=[False, True], ids=["jnp", "native"])
def kernel_path(request):
    if request.param:
        assert cpu_attention.available(), "the native CPU attention kernel did not build"
    _PATH["native"] = request.param
    yield
    _PATH["native"] = False


def _make_batch(rng, specs, *, num_heads, num_kv_heads, dtype):
    """Random ragged step: unpaged per-sequence K/V plus the padded kernel inputs."""
    pages = rng.permutation(np.arange(1, NUM_BLOCKS))  # shuffled, never the null page 0
    block_tables = np.zeros((NUM_ROWS, MAX_BLOCKS), np.int32)
    seq_lens = np.zeros(NUM_ROWS, np.int32)
    seqs, next_page = [], 0
    for row, (num_cached, num_new) in enumerate(specs):
        length = num_cached + num_new
        num_pages = -(-length // BLOCK_SIZE)
        block_tables[row, :num_pages] = pages[next_page:next_page + num_pages]
        next_page += num_pages
        seq_lens[row] = length
        kv_shape = (length, num_kv_heads, HEAD_DIM)
        seqs.append(dict(row=row, num_cached=num_cached, num_new=num_new,
                         k=_round(rng.standard_normal(kv_shape), dtype),
                         v=_round(rng.standard_normal(kv_shape), dtype)))
    return seqs, block_tables, seq_lens


def _round(x, dtype):
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)


def _slots(block_table_row, positions):
    return block_table_row[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE


def _step_inputs(rng, seqs, block_tables, *, num_heads, num_kv_heads, dtype,
                 num_tokens=NUM_TOKENS, pad_row=NUM_ROWS - 1):
    """Token-level arrays for the step; padding tokens sit at position 0 of row pad_row."""
    seq_ids = np.full(num_tokens, pad_row, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slot_mapping = np.zeros(num_tokens, np.int32)  # padding writes land in the null page
    kv_shape = (num_tokens, num_kv_heads, HEAD_DIM)
    k_new, v_new = rng.standard_normal(kv_shape), rng.standard_normal(kv_shape)
    start = 0
    for seq in seqs:
        pos = np.arange(seq["num_cached"], seq["num_cached"] + seq["num_new"], dtype=np.int32)
        tokens = slice(start, start + len(pos))
        seq_ids[tokens], positions[tokens] = seq["row"], pos
        slot_mapping[tokens] = _slots(block_tables[seq["row"]], pos)
        k_new[tokens], v_new[tokens] = seq["k"][pos], seq["v"][pos]
        seq["tokens"] = tokens
        start += len(pos)
    assert start <= num_tokens
    q = _round(rng.standard_normal((num_tokens, num_heads, HEAD_DIM)), dtype)
    return q, k_new, v_new, seq_ids, positions, slot_mapping


def _cache_with_context(rng, seqs, block_tables, *, num_kv_heads, dtype):
    """Garbage-filled cache holding each sequence's earlier-step context."""
    shape = (NUM_BLOCKS * BLOCK_SIZE, num_kv_heads, HEAD_DIM)
    k_cache, v_cache = 100 * rng.standard_normal(shape), 100 * rng.standard_normal(shape)
    for seq in seqs:
        pos = np.arange(seq["num_cached"])
        slots = _slots(block_tables[seq["row"]], pos)
        k_cache[slots], v_cache[slots] = seq["k"][pos], seq["v"][pos]
    return jnp.asarray(k_cache, dtype), jnp.asarray(v_cache, dtype)


def _dense_reference(q, k, v, positions, *, scale, sliding_window, soft_cap,
                     attention_chunk=None):
    """Naive causal attention for one sequence in float64: q [t, N, H], k/v [L, K, H]."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("tnh,snh->nts", q, k) * scale
    if soft_cap is not None:
        scores = soft_cap * np.tanh(scores / soft_cap)
    key_pos = np.arange(k.shape[0])
    mask = key_pos[None, :] <= positions[:, None]
    if sliding_window is not None:
        mask &= key_pos[None, :] > positions[:, None] - sliding_window
    if attention_chunk is not None:
        mask &= key_pos[None, :] // attention_chunk == positions[:, None] // attention_chunk
    scores = np.where(mask[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("nts,snh->tnh", probs, v)


_STATIC = ("scale", "sliding_window", "soft_cap", "kv_chunk", "knobs", "attention_chunk")


def step_with(kernel):
    """The jitted step of these tests (write the new K/V, then attend) over `kernel`, which
    takes ragged_paged_attention's arguments; the Pallas kernels' tests pass theirs.
    knobs: (name, value) pairs of the kernel's other tuning arguments (tile, decode_chunk,
    decode_group); tests shrink them so that small batches still cross every boundary
    (tiles splitting runs and kv chunks, several decode groups)."""
    @functools.partial(jax.jit, static_argnames=_STATIC)
    def step(k_cache, v_cache, k_new, v_new, slot_mapping, q, seq_ids, positions, block_tables,
             *, scale, sliding_window, soft_cap, kv_chunk, knobs=(), attention_chunk=None):
        k_cache, v_cache = write_kv(k_cache, v_cache, k_new, v_new, slot_mapping)
        out = kernel(q, k_cache, v_cache, seq_ids, positions, block_tables,
                     block_size=BLOCK_SIZE, scale=scale, sliding_window=sliding_window,
                     soft_cap=soft_cap, attention_chunk=attention_chunk, kv_chunk=kv_chunk,
                     **dict(knobs))
        return k_cache, v_cache, out
    return step


_step = step_with(ragged_paged_attention)


def _run_and_check(seed, specs, *, num_heads, num_kv_heads, dtype=jnp.float32, tol=1e-5,
                   sliding_window=None, soft_cap=None, attention_chunk=None, kv_chunk=64,
                   step=_step,
                   num_tokens=NUM_TOKENS, pad_row=NUM_ROWS - 1, shuffle=False,
                   cache_dtype=None, **knobs):
    """cache_dtype: the cache's dtype where it differs from dtype (q, the new K/V rows and
    the output); the sequences' K/V are drawn already rounded to it, so that the float64
    reference sees exactly what the cache holds."""
    knobs.setdefault("native", _PATH["native"])
    rng = np.random.default_rng(seed)
    seqs, block_tables, seq_lens = _make_batch(rng, specs, num_heads=num_heads,
                                               num_kv_heads=num_kv_heads,
                                               dtype=cache_dtype or dtype)
    q, k_new, v_new, seq_ids, positions, slot_mapping = _step_inputs(
        rng, seqs, block_tables, num_heads=num_heads, num_kv_heads=num_kv_heads, dtype=dtype,
        num_tokens=num_tokens, pad_row=pad_row)
    k_cache, v_cache = _cache_with_context(rng, seqs, block_tables,
                                           num_kv_heads=num_kv_heads, dtype=cache_dtype or dtype)
    scale = HEAD_DIM ** -0.5
    # shuffle: hand the kernel the tokens in random order (breaking the contiguous runs it
    # plans its work around); the answer per token must not change.
    order = rng.permutation(num_tokens) if shuffle else np.arange(num_tokens)
    k_cache, v_cache, out = step(
        k_cache, v_cache, jnp.asarray(k_new[order], dtype), jnp.asarray(v_new[order], dtype),
        slot_mapping[order], jnp.asarray(q[order], dtype), seq_ids[order], positions[order],
        block_tables,
        scale=scale, sliding_window=sliding_window, soft_cap=soft_cap, kv_chunk=kv_chunk,
        knobs=tuple(sorted(knobs.items())), attention_chunk=attention_chunk)
    assert out.dtype == dtype and out.shape == q.shape
    out = np.asarray(out.astype(jnp.float32), np.float64)[np.argsort(order)]
    assert np.isfinite(out).all(), "padding tokens must stay finite too"
    k_cache = np.asarray(k_cache.astype(jnp.float32))
    for seq in seqs:
        all_pos = np.arange(seq["num_cached"] + seq["num_new"])
        np.testing.assert_array_equal(  # write_kv + context: the cache holds the sequence
            k_cache[_slots(block_tables[seq["row"]], all_pos)], seq["k"].astype(np.float32))
        tokens = seq["tokens"]
        expected = _dense_reference(q[tokens], seq["k"], seq["v"], positions[tokens],
                                    scale=scale, sliding_window=sliding_window,
                                    soft_cap=soft_cap, attention_chunk=attention_chunk)
        np.testing.assert_allclose(out[tokens], expected, rtol=tol, atol=tol)
    _check_padding(out, q, seqs, pad_row, scale=scale, sliding_window=sliding_window,
                   soft_cap=soft_cap, attention_chunk=attention_chunk, tol=tol)


def _check_padding(out, q, seqs, pad_row, *, tol, **attention):
    """Padding tokens are queries at position 0 of pad_row: where that row is a real
    sequence, they see exactly its key 0 (whichever path they took)."""
    pad_seq = [seq for seq in seqs if seq["row"] == pad_row]
    first_pad = max([seq["tokens"].stop for seq in seqs], default=0)
    if not pad_seq or first_pad == len(q):
        return
    (seq,) = pad_seq
    pad = slice(first_pad, len(q))
    expected = _dense_reference(q[pad], seq["k"][:1], seq["v"][:1],
                                np.zeros(len(q) - first_pad, np.int64), **attention)
    np.testing.assert_allclose(out[pad], expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
def test_mixed_batch_matches_dense(seed, num_heads, num_kv_heads):
    _run_and_check(seed, MIXED, num_heads=num_heads, num_kv_heads=num_kv_heads)


@pytest.mark.parametrize("seed", [3, 4])
def test_sliding_window(seed):
    # 40 < kv_chunk: whole early chunks fall outside the window for the decode tokens.
    _run_and_check(seed, MIXED, num_heads=8, num_kv_heads=2, sliding_window=40)


@pytest.mark.parametrize("seed", [5, 6])
def test_soft_cap(seed):
    # A small cap (scores are ~N(0, 1)) so that tanh actually bends them.
    _run_and_check(seed, MIXED, num_heads=8, num_kv_heads=2, soft_cap=1.5)


def test_window_and_soft_cap_with_chunk_of_one_block():
    _run_and_check(7, MIXED, num_heads=8, num_kv_heads=2, sliding_window=100, soft_cap=3.0,
                   kv_chunk=BLOCK_SIZE)


def test_kv_chunk_wider_than_block_table():
    # 512 > MAX_BLOCKS * BLOCK_SIZE = 384: block indices past the table must be clamped.
    _run_and_check(8, MIXED, num_heads=8, num_kv_heads=2, kv_chunk=512)


@pytest.mark.parametrize("seed", [9, 10])
def test_bfloat16(seed):
    # Inputs and cache in bf16, math in f32, output rounded to bf16 (8 mantissa bits).
    _run_and_check(seed, MIXED, num_heads=8, num_kv_heads=2, dtype=jnp.bfloat16, tol=1e-2)


@pytest.mark.parametrize("case", [
    dict(specs=MIXED, num_heads=8, num_kv_heads=2),
    dict(specs=ALL_DECODE, num_heads=8, num_kv_heads=2, sliding_window=40),
    dict(specs=MIXED, num_heads=8, num_kv_heads=2, soft_cap=1.5, attention_chunk=40),
    dict(specs=MIXED, num_heads=8, num_kv_heads=2, sliding_window=40, shuffle=True),
], ids=["gqa", "decode-window", "soft-cap-chunk", "window-shuffled"])
def test_bfloat16_cache_with_float32_queries(case):
    """The CPU's cache for a 16-bit model (runner/build.py): a bfloat16 cache under float32
    queries and output, as exact as a float32 cache on the same (bfloat16) K/V."""
    case = dict(case)
    _run_and_check(40, case.pop("specs"), cache_dtype=jnp.bfloat16, **case)


def test_all_padding_rows_stay_finite():
    _run_and_check(11, [], num_heads=8, num_kv_heads=2)


@pytest.mark.parametrize("knob", ["kv_chunk", "decode_chunk"])
def test_key_chunks_must_be_block_multiples(knob):
    q = jnp.zeros((4, 8, HEAD_DIM))
    cache = jnp.zeros((NUM_BLOCKS * BLOCK_SIZE, 2, HEAD_DIM))
    ids = jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="whole pages"):
        ragged_paged_attention(q, cache, cache, ids, ids, jnp.zeros((1, 4), jnp.int32),
                               block_size=BLOCK_SIZE, scale=1.0, **{knob: 24})


@pytest.mark.parametrize("specs", [MIXED, ONE_PREFILL], ids=["mixed", "prefill"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
def test_small_tiles_split_runs_and_cross_chunks(specs, num_heads, num_kv_heads):
    # tile 8 splits every longer run; tiles start mid-chunk and span two 16-key chunks.
    _run_and_check(30, specs, num_heads=num_heads, num_kv_heads=num_kv_heads,
                   kv_chunk=BLOCK_SIZE, tile=8)


def test_tile_wider_than_kv_chunk_and_odd_tile():
    # tile 12 is no power of two; a 37-token run ends in a partial tile.
    _run_and_check(31, MIXED, num_heads=8, num_kv_heads=2, kv_chunk=32, tile=12)


@pytest.mark.parametrize("decode_chunk", [BLOCK_SIZE, 64, 512])
def test_decode_groups_and_chunks(decode_chunk):
    # Groups of 2 decode tokens: several groups with different longest contexts; 512 keys
    # per chunk is wider than the block table (indices clamped, keys masked).
    _run_and_check(32, ALL_DECODE, num_heads=8, num_kv_heads=2, decode_group=2,
                   decode_chunk=decode_chunk)


def test_sliding_window_skips_early_chunks_in_both_paths():
    # Window 20 with 16-key chunks: tiles and decode groups start past chunk 0.
    _run_and_check(33, MIXED, num_heads=8, num_kv_heads=2, sliding_window=20,
                   kv_chunk=BLOCK_SIZE, tile=8, decode_chunk=BLOCK_SIZE, decode_group=2)
    _run_and_check(34, ONE_PREFILL, num_heads=8, num_kv_heads=2, sliding_window=20,
                   kv_chunk=BLOCK_SIZE, tile=16)


@pytest.mark.parametrize("attention_chunk", [8, 40, 128])
def test_chunked_local_attention(attention_chunk):
    # Llama 4's local layers: keys of the query's own chunk only. 8 < block and kv chunk;
    # 40 is no multiple of either; 128: decode tokens at 300 and 129 skip whole kv chunks.
    _run_and_check(50 + attention_chunk, MIXED, num_heads=8, num_kv_heads=2,
                   attention_chunk=attention_chunk)


def test_chunked_local_attention_in_small_tiles_and_decode_groups():
    _run_and_check(51, MIXED, num_heads=8, num_kv_heads=2, attention_chunk=24,
                   kv_chunk=BLOCK_SIZE, tile=8, decode_chunk=BLOCK_SIZE, decode_group=2)
    _run_and_check(52, ALL_DECODE, num_heads=8, num_kv_heads=2, attention_chunk=32,
                   decode_chunk=BLOCK_SIZE, decode_group=2, pad_row=0)
    _run_and_check(53, ONE_PREFILL, num_heads=4, num_kv_heads=4, attention_chunk=16,
                   kv_chunk=BLOCK_SIZE, tile=12)


def test_chunked_attention_with_window_and_soft_cap():
    # Both masks at once (no model combines them, but neither may undo the other).
    _run_and_check(54, MIXED, num_heads=8, num_kv_heads=2, attention_chunk=64,
                   sliding_window=20, soft_cap=2.0, kv_chunk=BLOCK_SIZE)


def test_bfloat16_small_tiles():
    _run_and_check(35, MIXED, num_heads=8, num_kv_heads=2, dtype=jnp.bfloat16, tol=1e-2,
                   kv_chunk=BLOCK_SIZE, tile=8, decode_group=2)


def test_runner_padding_convention():
    # The runner pads with tokens of row 0 at position 0: a run of their own after the
    # last request, not merged into it (the default pad_row is the last row).
    for seed, specs in enumerate([MIXED, ALL_DECODE, ONE_PREFILL]):
        _run_and_check(36 + seed, specs, num_heads=8, num_kv_heads=2, pad_row=0)


def test_more_single_token_runs_than_decode_slots():
    # 6 decodes + 1 padding token of row 0 = 7 one-token runs for min(T, B) = 6 decode
    # slots: the last one falls back to a one-token tile.
    _run_and_check(40, ALL_DECODE, num_heads=8, num_kv_heads=2, num_tokens=7, pad_row=0)


@pytest.mark.parametrize("specs", [MIXED, ALL_DECODE], ids=["mixed", "decode"])
def test_tokens_in_any_order(specs):
    # Shuffled tokens make mostly one-token runs, far more than the decode slots, and
    # several runs per request: the split of the work changes, the results must not.
    _run_and_check(41, specs, num_heads=8, num_kv_heads=2, shuffle=True, decode_group=2)


def test_one_program_serves_every_mix():
    """Same padded shapes, different seq_lens and decode/prefill mixes: one compilation.

    Two counters: a Python side effect inside the traced function (runs once per trace, and
    jit compiles once per trace), and jax.jit's private `_cache_size()` (entries in the
    compiled-executable cache) where this jax version has it.
    """
    num_traces = []

    def counted_step(*args, **kwargs):
        num_traces.append(1)
        return _step.__wrapped__(*args, **kwargs)

    jitted = jax.jit(counted_step, static_argnames=_STATIC)
    for seed, specs in enumerate([MIXED, ALL_DECODE, ONE_PREFILL, [], MIXED[:2]]):
        _run_and_check(20 + seed, specs, num_heads=8, num_kv_heads=2, step=jitted)
    assert len(num_traces) == 1
    if hasattr(jitted, "_cache_size"):
        assert jitted._cache_size() == 1


def test_write_kv_one_token():
    """One token (the batch-1 decode bucket) takes the two-equal-rows path: only its slot
    changes, in both caches."""
    rng = np.random.default_rng(3)
    k_cache = jnp.asarray(rng.standard_normal((64, 2, 8)), jnp.float32)
    v_cache = jnp.asarray(rng.standard_normal((64, 2, 8)), jnp.float32)
    k_new = jnp.asarray(rng.standard_normal((1, 2, 8)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((1, 2, 8)), jnp.float32)
    k_out, v_out = jax.jit(write_kv)(k_cache, v_cache, k_new, v_new, jnp.array([37], jnp.int32))
    k_ref, v_ref = np.array(k_cache), np.array(v_cache)
    k_ref[37], v_ref[37] = k_new[0], v_new[0]
    np.testing.assert_array_equal(np.asarray(k_out), k_ref)
    np.testing.assert_array_equal(np.asarray(v_out), v_ref)


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_write_kv_rounds_as_astype(cache_dtype):
    """The rows a 16- or 8-bit cache stores are jnp's astype of them (round to nearest even,
    fp8 saturated), bit for bit, at their slots (out-of-range slots dropped, as a scatter
    with mode="drop"); every other slot keeps its bytes. Halfway cases included."""
    rng = np.random.default_rng(4)
    cache = jnp.asarray(rng.standard_normal((64, 2, 8)), cache_dtype)
    new = rng.standard_normal((6, 2, 8)).astype(np.float32)
    bits = new.view(np.uint32)
    bits[0] = (bits[0] & 0xFFFF0000) | 0x8000  # bfloat16 ties: even and odd last bits
    bits[1] = (bits[1] & 0xFFFE0000) | 0x18000
    new[2, 0, :2] = 1e6  # past fp8's range: saturated
    slots = np.array([37, 3, 63, 64, -1, 10], np.int32)  # 64 and -1: outside, dropped
    args = (cache, cache, jnp.asarray(new), jnp.asarray(new), slots)
    out, _ = jax.jit(write_kv)(*args)
    # In place: no copy of the whole cache in a wider type (XLA's CPU scatter into a
    # bfloat16 or fp8 array converts all of it to float32 or float16 and back).
    compiled = jax.jit(write_kv).lower(*args).compile().as_text()
    assert not re.search(r"(?<![a-z0-9])f(32|16)\[64,2,8\]", compiled)
    expected = np.array(cache)
    rows = np.asarray(jnp.clip(new, -float(jnp.finfo(cache_dtype).max),
                               float(jnp.finfo(cache_dtype).max)).astype(cache_dtype))
    expected[slots[[0, 1, 2, 5]]] = rows[[0, 1, 2, 5]]
    assert np.asarray(out).tobytes() == expected.tobytes()


@pytest.mark.parametrize("poison", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("window,knobs", [
    (40, {}),
    (20, dict(kv_chunk=BLOCK_SIZE, tile=8, decode_chunk=BLOCK_SIZE, decode_group=2)),
], ids=["default", "small"])
def test_pages_outside_the_window_never_reach_the_output(poison, window, knobs):
    """A sliding-window layer's block table as vLLM's hybrid KV cache leaves it: pages wholly
    before the window of a request's first new token are freed, and come back as the null
    page 0 (a new or resumed request) or stay as stale ids now owned by someone else (a
    running request). The null page, the stale pages and the unused pages are full of
    NaN or inf: outputs must still equal the float64 reference exactly (to rounding)."""
    rng = np.random.default_rng(60)
    seqs, block_tables, _ = _make_batch(rng, MIXED, num_heads=8, num_kv_heads=2,
                                        dtype=jnp.float32)
    q, k_new, v_new, seq_ids, positions, slot_mapping = _step_inputs(
        rng, seqs, block_tables, num_heads=8, num_kv_heads=2, dtype=jnp.float32,
        pad_row=NUM_ROWS - 1)
    k_cache, v_cache = (np.array(c) for c in _cache_with_context(
        rng, seqs, block_tables, num_kv_heads=2, dtype=jnp.float32))
    in_use = set()
    num_freed = 0
    for seq in seqs:
        table = block_tables[seq["row"]]
        first_key = max(0, seq["num_cached"] - window + 1)  # vLLM: get_num_skipped_tokens
        freed = first_key // BLOCK_SIZE
        num_freed += freed
        if seq["row"] % 2:  # stale ids: the pages stay in the table, with other data now
            k_cache[_slots(table, np.arange(freed * BLOCK_SIZE))] = poison
            v_cache[_slots(table, np.arange(freed * BLOCK_SIZE))] = -poison
        else:
            table[:freed] = 0
        in_use |= set(table[freed:len(seq["k"]) // BLOCK_SIZE + 1].tolist())
    assert num_freed >= 10 and (block_tables == 0).sum() > 0
    unused = np.array(sorted(set(range(NUM_BLOCKS)) - in_use))  # the null page 0 among them
    assert 0 in unused
    pages = unused[:, None] * BLOCK_SIZE + np.arange(BLOCK_SIZE)
    k_cache[pages.reshape(-1)], v_cache[pages.reshape(-1)] = poison, poison
    scale = HEAD_DIM ** -0.5
    knobs = dict(knobs, native=_PATH["native"])
    kv_chunk = knobs.pop("kv_chunk", 64)
    _, _, out = _step(jnp.asarray(k_cache), jnp.asarray(v_cache), jnp.asarray(k_new, jnp.float32),
                      jnp.asarray(v_new, jnp.float32), slot_mapping, jnp.asarray(q, jnp.float32),
                      seq_ids, positions, block_tables, scale=scale, sliding_window=window,
                      soft_cap=None, kv_chunk=kv_chunk, knobs=tuple(sorted(knobs.items())))
    out = np.asarray(out, np.float64)
    for seq in seqs:
        tokens = seq["tokens"]
        expected = _dense_reference(q[tokens], seq["k"], seq["v"], positions[tokens],
                                    scale=scale, sliding_window=window, soft_cap=None)
        np.testing.assert_allclose(out[tokens], expected, rtol=1e-5, atol=1e-5)
