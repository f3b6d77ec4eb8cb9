"""The serving processes' malloc: mimalloc (the cmeel-mimalloc wheel), preloaded into the
processes started after this is called.

Why: each decoded token, the engine core's host thread (vLLM's scheduler, the step's batch,
JAX's dispatch of the step's ~130 arrays) allocates and frees many small objects, and with
glibc's malloc a fifth of that thread's time went to its bins (`_int_malloc`,
`malloc_consolidate`, `unlink_chunk`): on two cores that time comes off the decode step's
second core. With mimalloc the engine thread's CPU a token fell by a fifth and batch-1 TPOT
by 6-8% through the server, for ~1.7 s more start-up (benchmarks/RESULTS.md, 2026-12-05
second session). vLLM's CPU platform preloads the
tcmalloc it bundles for the same reason (vllm/platforms/cpu.py).

LD_PRELOAD takes effect when a process starts: `xla-inference serve` sets it before it
execs the server (the server and the engine core it forks), and the platform's
check_and_update_config sets it in the environment of the engine core vLLM spawns
(`vllm serve`, `vllm.LLM`). An engine run inside the calling process (vLLM's
VLLM_ENABLE_V1_MULTIPROCESSING=0) keeps the allocator it started with.

Imports nothing of vllm or torch (the command-line front-end calls it before vLLM loads).
"""

import importlib.metadata
import os
import sys

from xla_inference import envs

# Where the cmeel-mimalloc wheel puts the library, under its site-packages.
_LIBRARY = "cmeel.prefix/lib/libmimalloc.so.3"
# A user's own allocator in LD_PRELOAD wins (and one allocator at a time).
_ALLOCATORS = ("libmimalloc", "libtcmalloc", "libjemalloc")


def mimalloc_library() -> str | None:
    """The installed mimalloc's path, or None without the wheel."""
    try:
        path = importlib.metadata.distribution("cmeel-mimalloc").locate_file(_LIBRARY)
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(path) if os.path.isfile(path) else None


def preload_mimalloc() -> str | None:
    """Put mimalloc first in os.environ's LD_PRELOAD, for the processes started after; the
    library's path, or None where left out: XLA_INFERENCE_MIMALLOC=0, not Linux, an
    allocator already in LD_PRELOAD, or the wheel not installed. Idempotent."""
    if not envs.mimalloc_enabled() or not sys.platform.startswith("linux"):
        return None
    preloaded = os.environ.get("LD_PRELOAD", "")
    if any(name in preloaded for name in _ALLOCATORS):
        return None
    library = mimalloc_library()
    if library is None:
        return None
    os.environ["LD_PRELOAD"] = f"{library}:{preloaded}" if preloaded else library
    return library
