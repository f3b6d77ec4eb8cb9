"""A single row times a dense bfloat16 weight as a native kernel for XLA's CPU backend
(cpu/dense_matvec.cc), called as an XLA FFI custom call: the products of a batch-1 decode
step when the projection matrices are bfloat16 (dtype=bfloat16 on the host CPU).

XLA's CPU backend compiles a one-row product against a bfloat16 [out, in] weight into a
loop fusion (widen, transpose, dot) that reads the weight at a fraction of the machine's
bandwidth: on this project's Xeon about 11 GB/s, the 30 layers' and the LM head's products
~24 of a 28 ms SmolLM2-135M step (benchmarks/RESULTS.md, issue 18, batch-1). The kernel
reads each weight row where it lies, 64 bytes a load, and shares the rows out over XLA's
intra-op thread pool where the weight is large enough to pay for waking a thread, or with
the spare core (cpu/spare_core.h) where the pool would add at most one thread
(XLA_INFERENCE_SPARE_CORE=0 turns that off).

The sums are those of XLA's product (x rounded to bfloat16, each product exact in float32,
summed in float32) in another order; the output does not depend on the thread count.
Built on first use like kernels/cpu_quantized.py (kernels/native.py);
XLA_INFERENCE_CPU_DENSE=0 turns it off, and available() then says False, as it does where
the build fails: callers then keep XLA's product.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp

from xla_inference import envs
from xla_inference.kernels import native

logger = logging.getLogger(__name__)

# This kernel's builds (tests, benchmarks); the default one is native.SPARE_CORE_KERNELS.
_SOURCE = (native.SPARE_CORE, Path(__file__).parent / "cpu" / "dense_matvec.cc")
_TARGET = "xla_inference_dense_matvec"
_SYMBOL = "XlaInferenceDenseMatvec"
_MULTI_TARGET = "xla_inference_dense_matvec_multi"
_MULTI_SYMBOL = "XlaInferenceDenseMatvecMulti"


_MATMUL_SOURCE = Path(__file__).parent / "cpu" / "dense_matmul.cc"
_MATMUL_TARGET = "xla_inference_dense_matmul"
_MATMUL_SYMBOL = "XlaInferenceDenseMatmul"


# Rows from which, on a host CPU without native bfloat16 dot products (avx512_bf16), a
# bfloat16 x bfloat16 product runs in float32 on the widened operands (bfloat16_product).
WIDEN_MIN_ROWS = 128


def bfloat16_product(x: jax.Array, w: jax.Array, accumulate) -> jax.Array:
    """x [R, in] times w [out, in], of one dtype (bfloat16; float32 passes through as it
    is), summed in `accumulate` (float32): XLA's product. Without native bfloat16 dot
    products XLA's CPU backend runs that product slower than a float32 one on the same
    numbers (AVX2 only, benchmarks/RESULTS.md, sixth session of 2026-12-03). So from
    WIDEN_MIN_ROWS rows on (prefill, large batches) it widens both operands to float32 and
    multiplies there. Each product of two bfloat16 numbers is exact in float32, so it gives
    the same sums in another order. Widening the weight costs one pass over it a call,
    small beside that many rows."""
    if (x.shape[0] >= WIDEN_MIN_ROWS and accumulate == jnp.float32
            and jax.default_backend() == "cpu" and not native.has_bfloat16_dot()):
        x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    return jnp.einsum("ri,oi->ro", x, w, preferred_element_type=accumulate)


@functools.cache
def _library():
    return native.load_spare_core_kernel(_SOURCE, {_TARGET: _SYMBOL, _MULTI_TARGET: _MULTI_SYMBOL})


@functools.cache
def available() -> bool:
    """Whether the native kernel is built and registered (XLA_INFERENCE_CPU_DENSE=0 turns
    it off)."""
    if not envs.cpu_dense_enabled():
        return False
    envs.spare_core_enabled()  # a typo fails here, naming the variable, not as a build failure
    return native.loads(_library, "bfloat16 matvec", "XLA's product")


def uses_avx512() -> bool:
    """Whether the built kernel took its AVX-512 path (else the portable one); needs
    available()."""
    return bool(_library().XlaInferenceDenseMatvecAvx512())


def ffi_dense_matvec(target: str, x, w):
    """dense_matvec through the FFI target `target` (a build of dense_matvec.cc)."""
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32))
    return call(x.astype(jnp.bfloat16), w)


def dense_matvec(x, w):
    """y float32 [T, out] = x [T, in] (rounded to bfloat16) times w bfloat16 [out, in]
    transposed, summed in float32. Meant for T = 1 (any T is computed, each row reading the
    whole weight). Needs available(); usable inside jit."""
    return ffi_dense_matvec(_TARGET, x, w)


def ffi_dense_matvec_multi(target: str, x, ws):
    """dense_matvec_multi through the FFI target `target` (a build of dense_matvec.cc)."""
    call = jax.ffi.ffi_call(
        target, [jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32) for w in ws])
    return list(call(x.astype(jnp.bfloat16), *ws))


def dense_matvec_multi(x, ws):
    """[dense_matvec(x, w) for w in ws], the same bits, in one call: x split once and the
    rows of all the weights (bfloat16 [out_j, in], one `in`) shared out over the threads
    together. A layer's products that share their input (q, k, v; gate, up) take it: one
    launch instead of several, and one pool wake-up for their bytes together. Needs
    available(); usable inside jit."""
    _library()  # registers the targets (once)
    return ffi_dense_matvec_multi(_MULTI_TARGET, x, ws)


@functools.cache
def _matmul_library():
    return native.load_targets(_MATMUL_SOURCE, {_MATMUL_TARGET: _MATMUL_SYMBOL})


@functools.cache
def matmul_available() -> bool:
    """Whether the several-row AMX kernel (cpu/dense_matmul.cc) is built, registered and has
    the tiles' permission: False without AMX (another CPU), where the build fails, or with
    XLA_INFERENCE_CPU_DENSE=0 or XLA_INFERENCE_CPU_DENSE_MATMUL=0; callers then keep XLA's
    product."""
    if not envs.cpu_dense_matmul_enabled():
        return False
    try:
        return bool(_matmul_library().XlaInferenceDenseMatmulAmx())
    except Exception as e:  # noqa: BLE001 - any failure means XLA's product
        logger.warning("xla-inference: native CPU bfloat16 AMX matmul unavailable: %s", e)
        return False


def dense_matmul(x, w):
    """y float32 [T, out] = x [T, in] (rounded to bfloat16) times w bfloat16 [out, in]
    transposed, on the AMX tiles (pairs of products added in float32, then summed in
    float32). Any T; needs matmul_available(); usable inside jit."""
    _matmul_library()  # registers the target (once)
    call = jax.ffi.ffi_call(_MATMUL_TARGET,
                            jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32))
    return call(x.astype(jnp.bfloat16), w)
