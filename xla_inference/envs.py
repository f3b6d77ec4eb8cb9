"""Every XLA_INFERENCE_* environment variable, its default and its meaning, in one place.

A leaf module: it imports nothing of this package (any layer may read a setting). Values
are read when asked for, not at import, so a test or a launcher can set them late.
"""

import os
from pathlib import Path

# name -> (default, meaning); the README's table lists the same.
VARIABLES: dict[str, tuple[str, str]] = {
    "XLA_INFERENCE_CACHE": (
        "~/.cache/xla-inference",
        "root of what xla-inference builds: prepared models, JAX's persistent compilation "
        "cache, compiled native kernels"),
    "XLA_INFERENCE_CPU_ATTENTION": (
        "1",
        "0 runs the plain-jnp attention kernel on the CPU instead of the native one"),
    "XLA_INFERENCE_CPU_DENSE": (
        "1",
        "0 runs a one-row product against bfloat16 projection matrices (a batch-1 decode "
        "step) through XLA's product instead of the native CPU kernel"),
    "XLA_INFERENCE_CPU_DENSE_MATMUL": (
        "1",
        "0 runs the products of 2-128 rows against bfloat16 projection matrices (batched "
        "decode steps) through XLA's product instead of the native AMX kernel (CPUs with "
        "AMX-BF16); XLA_INFERENCE_CPU_DENSE=0 turns it off too"),
    "XLA_INFERENCE_HUGE_PAGES": (
        # Off by default: through the server (benchmarks/serving.py, idle, 2026-12-02) it made
        # batch-1 GGUF and int8 TPOT slower (13.3 -> 15.2 ms, 15.1 -> 18.1 ms), though the
        # engine-step benchmark had them faster; opt in where it is measured to help.
        "0",
        "1 asks Linux (6.1+) to move the weights' host buffers onto 2 MiB huge pages with "
        "MADV_COLLAPSE, once, after placing them (fewer TLB misses per decode step; skipped "
        "where /sys/kernel/mm/transparent_hugepage/enabled is never, which MADV_COLLAPSE "
        "itself would ignore); 0, the default, leaves them on the pages XLA gave them"),
    "XLA_INFERENCE_CPU_QUANTIZED": (
        "1",
        "0 turns off the native CPU kernel for int4/int8 quantized matrix products"),
    "XLA_INFERENCE_WEIGHT_TABLE": (
        "1",
        "0 passes a decode step's quantized weights to its program as arrays (three a weight); "
        "1, on the host CPU with one device, names them by address in one small table "
        "(quantization/weight_table.py: fewer arrays for the host's jit call each step)"),
    "XLA_INFERENCE_SPARE_CORE": (
        "1",
        "0 keeps the native CPU kernels' short calls (a decode step's one-row bfloat16 and "
        "quantized products and its attention, too short to wake XLA's thread pool) on the "
        "calling thread or the pool; 1 shares them with one helper thread that spins at "
        "SCHED_IDLE between them (kernels/cpu/spare_core.h: a second core reads the weights "
        "beside the first; read when the kernels are first loaded)"),
    "XLA_INFERENCE_GMM_BACKEND": (
        "",
        "the MoE grouped matmul: tpu or gpu forces that Pallas kernel (interpret mode off "
        "such a device), xla keeps jax.lax.ragged_dot; empty follows XLA_INFERENCE_KERNELS"),
    "XLA_INFERENCE_MOE_DISPATCH": (
        "auto",
        "expert parallel MoE: all-to-all sends each token's rows only to the devices holding "
        "its experts and back, all-reduce routes the replicated tokens on every device and "
        "sums; auto takes all-to-all where it moves fewer bytes (layers/moe.py)"),
    "XLA_INFERENCE_IMAGE_SIZES": (
        "",
        "image sizes, HEIGHTxWIDTH in pixels, comma-separated (e.g. 448x448,720x1280), whose "
        "vision-encoder programs a multimodal model compiles at start-up; an image of another "
        "size (after the processor's resize) compiles its program at its first request"),
    "XLA_INFERENCE_KERNELS": (
        "auto",
        "which attention kernels serve the process: auto (from JAX's default backend: cpu -> "
        "native, tpu -> pallas-tpu, gpu -> pallas-gpu), jnp (plain jnp everywhere), native "
        "(the C++ CPU kernel where it applies), pallas-tpu, pallas-gpu"),
    "XLA_INFERENCE_HOSTS": (
        "1",
        "JAX processes (hosts) one engine spans, joined by jax.distributed: above 1, the "
        "engine core runs process 0 (the driver: vLLM's scheduler) and the multi-host "
        "executor (distributed/multihost.py) starts or awaits the others (followers), or places "
        "them on a Ray cluster (--distributed-executor-backend ray: distributed/ray_executor.py)"),
    "XLA_INFERENCE_COORDINATOR": (
        "",
        "HOST:PORT of jax.distributed's coordinator (the driver's host); the driver's "
        "control channel to its followers listens on PORT+1. Empty: 127.0.0.1 and a free "
        "port (followers on this machine only)"),
    "XLA_INFERENCE_FOLLOWERS": (
        "local",
        "how followers start: local (the executor spawns them on this machine: tests, or "
        "several JAX processes on one host) or external (the operator runs `python -m "
        "xla_inference.distributed.multihost --coordinator HOST:PORT --process-id I` on each "
        "host, with the same XLA_INFERENCE_MULTIHOST_KEY)"),
    "XLA_INFERENCE_MULTIHOST_KEY": (
        "",
        "shared secret a follower presents on the control channel; external followers need "
        "it set, the same on every host (local ones get a random one)"),
    "XLA_INFERENCE_RAY_BUNDLE": (
        '{"CPU": 1}',
        "with --distributed-executor-backend ray: the Ray resources reserved on each host "
        "(one placement-group bundle per host, JSON), e.g. {\"TPU\": 4} or {\"GPU\": 8} so "
        "that Ray hands the follower's JAX process that host's accelerators"),
    "XLA_INFERENCE_JOIN_TIMEOUT": (
        "120",
        "seconds the driver waits for every follower to connect and for jax.distributed to "
        "join them before it fails, naming the missing processes"),
    "XLA_INFERENCE_PROCESS_ID": (
        "0",
        "this process's id among XLA_INFERENCE_HOSTS (set by the launcher: 0 is the driver)"),
    "XLA_INFERENCE_PALLAS_INTERPRET": (
        "0",
        "1 runs the Pallas kernels in interpret mode (any device, slow): with "
        "XLA_INFERENCE_KERNELS=pallas-tpu or pallas-gpu, a model step runs that accelerator's "
        "kernel on the CPU"),
    "XLA_INFERENCE_QMM_BACKEND": (
        "",
        "quantized projections (int8, fp8, int4 with groups): tpu or gpu packs them at load "
        "in the layout of that Pallas quantized matmul and runs it (interpret mode off such "
        "a device), xla keeps the native CPU kernel's layout and XLA's or the CPU kernel's "
        "products; empty follows XLA_INFERENCE_KERNELS"),
    "XLA_INFERENCE_MIMALLOC": (
        "1",
        "1 preloads mimalloc (the cmeel-mimalloc wheel) into the processes a server starts "
        "(`xla-inference serve`'s server and engine core, the engine core vLLM spawns), unless "
        "LD_PRELOAD already names an allocator; 0 leaves them on glibc's malloc"),
    "XLA_INFERENCE_STEP_STATS": (
        "0",
        "1 makes the engine wait for each program and split step time into host and device "
        "(changes timing; for benchmarks/offline_throughput.py)"),
}


def _get(name: str) -> str:
    return os.environ.get(name) or VARIABLES[name][0]


def _switch(name: str) -> bool:
    """A 0/1 variable: anything else fails, naming it (a typo must not flip a kernel)."""
    value = _get(name).strip()
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, not {value!r}")
    return value == "1"


def _number(name: str, kind=int):
    value = _get(name).strip()
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be a{'n integer' if kind is int else ' number'}, "
                         f"not {value!r}") from None


def cache_root() -> Path:
    """Where xla-inference keeps what it builds."""
    return Path(os.path.expanduser(_get("XLA_INFERENCE_CACHE")))


def cpu_attention_enabled() -> bool:
    return _switch("XLA_INFERENCE_CPU_ATTENTION")


def cpu_dense_enabled() -> bool:
    return _switch("XLA_INFERENCE_CPU_DENSE")


def cpu_dense_matmul_enabled() -> bool:
    return _switch("XLA_INFERENCE_CPU_DENSE") and _switch("XLA_INFERENCE_CPU_DENSE_MATMUL")


def cpu_quantized_enabled() -> bool:
    return _switch("XLA_INFERENCE_CPU_QUANTIZED")


def weight_table_enabled() -> bool:
    return _switch("XLA_INFERENCE_WEIGHT_TABLE")


def spare_core_enabled() -> bool:
    return _switch("XLA_INFERENCE_SPARE_CORE")


def huge_pages_enabled() -> bool:
    return _switch("XLA_INFERENCE_HUGE_PAGES")


def mimalloc_enabled() -> bool:
    return _switch("XLA_INFERENCE_MIMALLOC")


def step_stats_enabled() -> bool:
    return _switch("XLA_INFERENCE_STEP_STATS")


def kernels() -> str:
    """XLA_INFERENCE_KERNELS as given (kernels/backend.py checks and resolves it)."""
    return _get("XLA_INFERENCE_KERNELS").strip().lower()


def gmm_backend() -> str:
    """XLA_INFERENCE_GMM_BACKEND as given (kernels/pallas_gmm.py checks and resolves it)."""
    return _get("XLA_INFERENCE_GMM_BACKEND").strip().lower()


def moe_dispatch() -> str:
    """XLA_INFERENCE_MOE_DISPATCH: auto, all-to-all or all-reduce."""
    value = _get("XLA_INFERENCE_MOE_DISPATCH").strip().lower()
    if value not in ("auto", "all-to-all", "all-reduce"):
        raise ValueError(f"XLA_INFERENCE_MOE_DISPATCH must be auto, all-to-all or all-reduce, "
                         f"not {value!r}")
    return value


def qmm_backend() -> str:
    """XLA_INFERENCE_QMM_BACKEND as given (kernels/backend.pallas_route checks and resolves it)."""
    return _get("XLA_INFERENCE_QMM_BACKEND").strip().lower()


def image_sizes() -> list[tuple[int, int]]:
    """XLA_INFERENCE_IMAGE_SIZES as (height, width) pairs."""
    sizes = []
    for size in filter(None, (s.strip() for s in _get("XLA_INFERENCE_IMAGE_SIZES").split(","))):
        height, _, width = size.lower().partition("x")
        if not (height.isdigit() and width.isdigit()):
            raise ValueError(f"XLA_INFERENCE_IMAGE_SIZES: {size!r} is not HEIGHTxWIDTH in pixels")
        sizes.append((int(height), int(width)))
    return sizes


def pallas_interpret() -> bool:
    return _switch("XLA_INFERENCE_PALLAS_INTERPRET")


def num_hosts() -> int:
    return _number("XLA_INFERENCE_HOSTS")


def coordinator() -> str:
    return _get("XLA_INFERENCE_COORDINATOR")


def followers_launch() -> str:
    launch = _get("XLA_INFERENCE_FOLLOWERS")
    if launch not in ("local", "external"):
        raise ValueError(f"XLA_INFERENCE_FOLLOWERS must be local or external, not {launch!r}")
    return launch


def multihost_key() -> str:
    return _get("XLA_INFERENCE_MULTIHOST_KEY")


def join_timeout() -> float:
    return _number("XLA_INFERENCE_JOIN_TIMEOUT", float)


def ray_bundle() -> dict[str, float]:
    """XLA_INFERENCE_RAY_BUNDLE: resource name -> amount, each amount positive."""
    import json

    text = _get("XLA_INFERENCE_RAY_BUNDLE")
    try:
        bundle = json.loads(text)
    except ValueError:
        bundle = None
    if (not isinstance(bundle, dict) or not bundle
            or not all(isinstance(k, str) and isinstance(v, (int, float)) and v > 0
                       for k, v in bundle.items())):
        raise ValueError("XLA_INFERENCE_RAY_BUNDLE must be a JSON object of Ray resources and "
                         f"positive amounts, e.g. {{\"CPU\": 1}}, not {text!r}")
    return {k: float(v) for k, v in bundle.items()}


def process_id() -> int:
    return _number("XLA_INFERENCE_PROCESS_ID")
