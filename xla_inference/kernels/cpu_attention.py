"""Ragged paged attention as a native kernel for XLA's CPU backend (cpu/paged_attention.cc),
called from the compiled step as an XLA FFI custom call.

XLA's CPU code for the plain-jnp kernel spends most of attention's time on small page
gathers and reductions along the head dim, several times the time needed to read the
keys and values once (benchmarks/RESULTS.md). The
native kernel reads each key's [K, H] cache row where it lies: a lone query token (decode)
takes per-head dot products; up to 16 tokens of one sequence (prefill, chunks) share each
key read and compute across the tokens in vector lanes. It reads only the keys from the
earliest window start of a tile's tokens to its latest position: pages that vLLM's hybrid KV
cache freed behind a sliding window (the null page, or stale ids now another group's) lie
before that and are never read, and past a sequence's end nothing is read either (tested
with those pages full of NaN, tests/kernels/test_ragged_paged_attention.py). The kernel
shares these tiles out over XLA's own intra-op thread pool (sized by XLA to the CPUs the
process may run on), so a call starts no threads, and its output does not depend on how
many threads there are.

The kernel is compiled with the machine's C++ compiler on first use (a few seconds, cached
under ~/.cache/xla-inference/kernels, or $XLA_INFERENCE_CACHE/kernels, by source, flags,
CPU and JAX version); where that fails, or with XLA_INFERENCE_CPU_ATTENTION=0, the
plain-jnp kernel runs instead.
XLA's partitioner has no rule for the custom call: under a tensor-parallel mesh it would
gather the operands (the whole KV cache and q) onto every device, every layer. So the
layer that calls attention splits it itself: layers/attention.paged_attention runs the
cache write and this call in a shard_map over the KV heads, each device with its share of
the KV heads and their query heads, the token metadata whole (tests/parallel/
test_cpu_attention_tp.py: no collective left in the compiled step); MLA's latent attention,
whose one shared KV head cannot be split, runs it in a shard_map over the query heads with
the latent cache whole on each device (layers/mla.latent_paged_attention, tests/parallel/
test_mla_tp.py). The split sits there,
not here, because kernels/ sits below parallel/ (it cannot know the mesh's axes) and because
every backend's kernel (a Pallas call is a custom call too) needs the same split. CPU
tensor parallelism (virtual devices of one host) is for tests.

The cache may be float32, bfloat16 (the CPU's cache for a 16-bit model, runner/build.py:
half the bytes each step reads) or fp8. A bfloat16 or fp8 cache is written by this library
too (write_cache_rows): XLA's CPU backend runs a scatter into a bfloat16 or fp8 array by
converting the whole array to float32 (fp8: float16) and back, two copies of the whole
cache per layer per step, where the kernel copies just the step's rows in place.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference import envs
from xla_inference.kernels import native

# This kernel's builds (tests, benchmarks); the default one is native.SPARE_CORE_KERNELS.
_SOURCE = (native.SPARE_CORE, Path(__file__).parent / "cpu" / "paged_attention.cc")
_TARGET = "xla_inference_paged_attention"
_POOL_TARGET = "xla_inference_thread_pool_size"
_WRITE_TARGET = "xla_inference_write_cache_rows"


@functools.cache
def _library():
    return native.load_spare_core_kernel(_SOURCE, {
        _TARGET: "XlaInferencePagedAttention", _POOL_TARGET: "XlaInferenceThreadPoolSize",
        _WRITE_TARGET: "XlaInferenceWriteCacheRows"})


@functools.cache
def available() -> bool:
    """Whether the native kernel is built and registered (XLA_INFERENCE_CPU_ATTENTION=0
    turns it off)."""
    if not envs.cpu_attention_enabled():
        return False
    envs.spare_core_enabled()  # a typo fails here, naming the variable, not as a build failure
    return native.loads(_library, "attention", "the jnp kernel")


def paged_attention(q, k_cache, v_cache, seq_ids, positions, block_tables, *, block_size: int,
                    scale: float, sliding_window: int | None = None,
                    soft_cap: float | None = None, attention_chunk: int | None = None):
    """As ragged_paged_attention (a shared K/V: the one cache passed as both), for
    float32 q [T, N, H] and caches [num_slots, K, H] of float32, bfloat16, float8_e4m3fn or
    float8_e5m2 (fp8 values are read as they are: the caller applies the scales); returns
    [T, N, H] float32."""
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q.astype(jnp.float32), k_cache, v_cache, seq_ids.astype(jnp.int32),
                positions.astype(jnp.int32), block_tables.astype(jnp.int32),
                block_size=np.int64(block_size), scale=np.float32(scale),
                sliding_window=np.int64(sliding_window or 0),
                soft_cap=np.float32(soft_cap or 0.0),
                attention_chunk=np.int64(attention_chunk or 0))


def write_cache_rows(cache, rows, slots):
    """cache [num_slots, K, H] with rows [T, K, H] (already of the cache's dtype) copied
    into slots [T] (a slot outside the cache is skipped, as a scatter's mode="drop"), in
    place where XLA can alias the result to the cache (a donated or intermediate cache);
    needs available()."""
    call = jax.ffi.ffi_call(_WRITE_TARGET, jax.ShapeDtypeStruct(cache.shape, cache.dtype),
                            input_output_aliases={0: 0})
    return call(cache, rows.astype(cache.dtype), slots.astype(jnp.int32))


def pool_threads() -> int:
    """The threads of the XLA pool the kernel shares its work with (0: it runs on the
    calling thread alone); needs available()."""
    return int(jax.jit(jax.ffi.ffi_call(_POOL_TARGET, jax.ShapeDtypeStruct((), jnp.int32)))())
