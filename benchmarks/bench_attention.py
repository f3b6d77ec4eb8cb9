"""Per-layer ragged paged attention times on the serving shapes of SmolLM2-135M.

Run: .venv/bin/python benchmarks/bench_attention.py [--repeats 20]
Prints the median time of one layer's attention call (write_kv excluded) for three steps:
a T=64 decode of 64 sequences with contexts ~300, a T=512 prefill of one sequence, and a
T=512 mixed step (one 448-token prefill chunk + 64 decodes); then one more step with many
short chunked-prefill runs (64 requests x 8 tokens at contexts ~300), the worst case for
tiles of consecutive tokens of one sequence.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from xla_inference.kernels.ragged_paged_attention import ragged_paged_attention  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
BLOCK_SIZE = 16
NUM_PAGES = 2048
MAX_BLOCKS = 128  # max_model_len 2048
MAX_NUM_SEQS = 128


def build_step(specs, num_tokens, rng):
    """Kernel inputs for (cached, new) per sequence, padded like runner/requests.py does."""
    num_rows = min(num_tokens, MAX_NUM_SEQS)
    pages = rng.permutation(np.arange(1, NUM_PAGES))
    block_tables = np.zeros((num_rows, MAX_BLOCKS), np.int32)
    seq_ids = np.zeros(num_tokens, np.int32)  # padding tokens: row 0, position 0
    positions = np.zeros(num_tokens, np.int32)
    start, next_page = 0, 0
    for row, (num_cached, num_new) in enumerate(specs):
        length = num_cached + num_new
        num_pages = -(-length // BLOCK_SIZE)
        block_tables[row, :num_pages] = pages[next_page:next_page + num_pages]
        next_page += num_pages
        seq_ids[start:start + num_new] = row
        positions[start:start + num_new] = np.arange(num_cached, length)
        start += num_new
    q = rng.standard_normal((num_tokens, NUM_HEADS, HEAD_DIM), np.float32)
    return dict(q=q, seq_ids=seq_ids, positions=positions, block_tables=block_tables)


def cases(rng):
    decodes = [(int(c), 1) for c in rng.integers(260, 340, size=64)]
    short_chunks = [(int(c), 8) for c in rng.integers(260, 340, size=64)]
    return {
        "decode T=64 (64 seqs, ctx ~300)": build_step(decodes, 64, rng),
        "prefill T=512 (1 seq)": build_step([(0, 512)], 512, rng),
        "mixed T=512 (448 prefill + 64 decodes)": build_step([(0, 448)] + decodes, 512, rng),
        "extra: T=512 (64 x 8-token chunks, ctx ~300)": build_step(short_chunks, 512, rng),
    }


def time_case(fn, step, k_cache, v_cache, repeats):
    args = {k: jnp.asarray(v) for k, v in step.items()}
    fn(k_cache=k_cache, v_cache=v_cache, **args).block_until_ready()  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(k_cache=k_cache, v_cache=v_cache, **args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_fn(kernel=ragged_paged_attention, **options):
    def attention(q, k_cache, v_cache, seq_ids, positions, block_tables):
        return kernel(q, k_cache, v_cache, seq_ids, positions, block_tables,
                      block_size=BLOCK_SIZE, scale=HEAD_DIM ** -0.5, **options)
    return jax.jit(attention)


def main(kernel=ragged_paged_attention, **options):
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    repeats = parser.parse_known_args()[0].repeats
    rng = np.random.default_rng(0)
    shape = (NUM_PAGES * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = jnp.asarray(rng.standard_normal(shape, np.float32))
    v_cache = jnp.asarray(rng.standard_normal(shape, np.float32))
    fn = make_fn(kernel, **options)
    for name, step in cases(rng).items():
        seconds = time_case(fn, step, k_cache, v_cache, repeats)
        print(f"{name:46s} {seconds * 1e3:8.2f} ms per layer (median of {repeats})", flush=True)


if __name__ == "__main__":
    main()
