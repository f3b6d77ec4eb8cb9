"""Each row's argmax as a native kernel for XLA's CPU backend (cpu/row_argmax.cc), called as
an XLA FFI custom call: the sampler's greedy tokens (sampling/sampler.row_argmax) on the
host CPU, where XLA's own reduction of a float maximum runs as scalar code (its NaN rule
keeps it from vectorizing: ~210 us for one row of a 49152-token vocabulary, a few percent
of a batch-1 decode step; benchmarks/RESULTS.md, 2026-12-05 third session).

The same result as jnp.argmax: the first index of the maximum, a NaN counting as the
maximum. Built on first use (kernels/native.py) without -ffast-math, which would let the
compiler assume no NaNs; available() says False where the build fails, and callers keep
XLA's reduction.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from xla_inference.kernels import native

_SOURCE = Path(__file__).parent / "cpu" / "row_argmax.cc"
_TARGET = "xla_inference_row_argmax"
_SYMBOL = "XlaInferenceRowArgmax"
_FLAGS = (*(f for f in native.DEFAULT_FLAGS if f != "-ffast-math"), "-fno-fast-math")


@functools.cache
def _library():
    return native.load_targets(_SOURCE, {_TARGET: _SYMBOL}, _FLAGS)


@functools.cache
def available() -> bool:
    """Whether the native kernel is built and registered."""
    return native.loads(_library, "argmax", "XLA's reduction")


def path() -> int:
    """The build's path: 2 AVX-512, 1 AVX2, 0 portable (needs available())."""
    return int(_library().XlaInferenceRowArgmaxPath())


def row_argmax(logits: jax.Array) -> jax.Array:
    """logits float32 [B, V] -> int32 [B], jnp.argmax over the last axis. Needs
    available(); usable inside jit."""
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(logits.shape[:1], jnp.int32))
    return call(logits)
