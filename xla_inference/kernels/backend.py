"""Which kernels serve this process: chosen once from the device platform, overridable.

Attention backends (one contract, kernels/ragged_paged_attention.ragged_paged_attention):
- "jnp": the plain-jnp kernel (any device; the reference the others are tested against);
- "native": the C++ kernel for XLA's CPU backend (kernels/cpu_attention.py) where it can
  serve the call, else jnp;
- "pallas-tpu": the Pallas Mosaic kernel (kernels/pallas_tpu_attention.py);
- "pallas-gpu": the Pallas GPU kernel (kernels/pallas_gpu_attention.py).

XLA_INFERENCE_KERNELS=auto (the default) picks from jax.default_backend(): cpu -> native,
tpu -> pallas-tpu, gpu -> pallas-gpu (anything else -> jnp); any other value forces that
backend. A Pallas backend on a platform it does not compile for must run in interpret mode
(XLA_INFERENCE_PALLAS_INTERPRET=1): that is how the accelerator kernels are tested on a
CPU; without it the choice is refused with a clear error rather than failing deep inside
a compiler. The choice is logged once per process (once per distinct choice, should the
environment change, as in tests).

The choice is made when a step is traced: a process that changes the variables after
tracing must drop JAX's traces (jax.clear_caches()) for the new choice to take effect.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Callable

import jax
import jax.numpy as jnp

from xla_inference import envs

logger = logging.getLogger(__name__)

JNP, NATIVE, PALLAS_TPU, PALLAS_GPU = "jnp", "native", "pallas-tpu", "pallas-gpu"
ATTENTION_BACKENDS = (JNP, NATIVE, PALLAS_TPU, PALLAS_GPU)
_AUTO = {"cpu": NATIVE, "tpu": PALLAS_TPU, "gpu": PALLAS_GPU, "cuda": PALLAS_GPU,
         "rocm": PALLAS_GPU}
# The platform each Pallas backend compiles for, and the module holding its kernel.
_PALLAS = {PALLAS_TPU: ("tpu", "xla_inference.kernels.pallas_tpu_attention"),
           PALLAS_GPU: ("gpu", "xla_inference.kernels.pallas_gpu_attention")}

_logged: set = set()


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    name: str  # one of ATTENTION_BACKENDS
    platform: str  # jax.default_backend() when chosen
    interpret: bool  # Pallas backends: run in interpret mode
    reason: str  # why this one (for the log line)

    @property
    def is_pallas(self) -> bool:
        return self.name in _PALLAS


def product_precision(dtype):
    """The precision a Pallas kernel asks of its products for inputs of this dtype: float32
    gets HIGHEST (IEEE), since Triton rounds float32 dot inputs to TF32 and Mosaic to bf16
    unless told otherwise (TF32 put 1e-4 errors in the GPU attention kernel's float32 output
    on an H200); narrower dtypes take the hardware's own products."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _platform() -> str:
    platform = jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def attention_backend() -> AttentionBackend:
    """The attention backend of this process (read from the environment each call, so a
    test or launcher may set it late; logged the first time each choice is made)."""
    requested = envs.kernels()
    platform = _platform()
    interpret = envs.pallas_interpret()
    if requested == "auto":
        name = _AUTO.get(platform, JNP)
        reason = f"auto: JAX's default backend is {platform}"
    elif requested in ATTENTION_BACKENDS:
        name, reason = requested, "XLA_INFERENCE_KERNELS"
    else:
        raise ValueError(f"XLA_INFERENCE_KERNELS={requested!r}: expected auto or one of "
                         f"{', '.join(ATTENTION_BACKENDS)}")
    if name in _PALLAS:
        target = _PALLAS[name][0]
        if platform != target and not interpret:
            raise RuntimeError(
                f"attention backend {name} compiles for {target}, but JAX's default backend "
                f"is {platform}: set XLA_INFERENCE_PALLAS_INTERPRET=1 to run it in Pallas' "
                f"interpret mode, or choose another XLA_INFERENCE_KERNELS")
    backend = AttentionBackend(name, platform, interpret and name in _PALLAS, reason)
    _log_once(backend)
    return backend


def _log_once(backend: AttentionBackend) -> None:
    if backend in _logged:
        return
    _logged.add(backend)
    mode = " (Pallas interpret mode)" if backend.interpret else ""
    logger.info("xla-inference: attention kernels: %s%s (%s)", backend.name, mode,
                backend.reason)


def pallas_attention(backend: AttentionBackend) -> Callable:
    """The `paged_attention` function of a Pallas backend, imported on first use (the GPU
    module needs nothing of the TPU one, and the other way round). A backend whose module
    is missing is an error, never a silent fall back to another kernel."""
    module_name = _PALLAS[backend.name][1]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise RuntimeError(f"attention backend {backend.name} is not available: "
                           f"{module_name} does not exist in this installation") from e
    return module.paged_attention


def pallas_write_and_attend(backend: AttentionBackend) -> Callable | None:
    """The backend's kernel that writes this step's K/V rows and attends in one call
    (`write_and_attend`), or None where its module has none (the rows are then written
    by write_kv first)."""
    pallas_attention(backend)  # the same import, and the same error where it is missing
    return getattr(importlib.import_module(_PALLAS[backend.name][1]), "write_and_attend", None)


def note_fallback(backend: AttentionBackend, reason: str) -> None:
    """Log once that `backend` hands a kind of call to another kernel, and why."""
    if (backend, reason) in _logged:
        return
    _logged.add((backend, reason))
    logger.info("xla-inference: attention kernels: %s: %s", backend.name, reason)


# ------------------------------------------------------------------ matmul kernels' route

# The Pallas matmul kernels (the MoE GMM, the quantized matmul) follow the attention choice:
# the Pallas TPU or GPU attention backend brings the matmuls of that device, in the same
# mode; each kernel family has its own variable that overrides it ("tpu" or "gpu": that
# kernel, in interpret mode off such a device; "xla": XLA's product, whatever the rest).
_MATMUL_DEVICE = {PALLAS_TPU: "tpu", PALLAS_GPU: "gpu"}


@dataclasses.dataclass(frozen=True)
class PallasRoute:
    backend: str  # "tpu" or "gpu"
    interpret: bool


def _platform_kind() -> str | None:
    platform = jax.default_backend()
    return "tpu" if platform == "tpu" else "gpu" if platform in ("gpu", "cuda", "rocm") else None


def pallas_route(forced: str, variable: str) -> PallasRoute | None:
    """Which Pallas matmul kernel serves (None: XLA's product or the CPU's kernels), given
    the kernel family's override `forced` (the value of `variable`, "" when unset)."""
    if forced == "xla":
        return None
    if forced in ("tpu", "gpu"):
        return PallasRoute(forced, interpret=forced != _platform_kind())
    if forced:
        raise ValueError(f"{variable}={forced!r}: expected tpu, gpu or xla")
    chosen = attention_backend()
    kind = _MATMUL_DEVICE.get(chosen.name)
    return None if kind is None else PallasRoute(kind, interpret=chosen.interpret)
