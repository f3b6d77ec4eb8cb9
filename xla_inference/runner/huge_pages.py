"""The model's weights moved onto transparent huge pages (2 MiB) on the host CPU, once, after
the engine places them.

A decode step reads every weight byte once, spread over a few hundred arrays: with 4 KiB
pages that is one TLB miss per 4 KiB read (24,000 a step for a 96 MB GGUF SmolLM2), and
each miss costs a walk of both page tables under a hypervisor. Where transparent huge pages
are only granted on request (`/sys/kernel/mm/transparent_hugepage/enabled` = madvise, as on
the 2-core KVM machine of benchmarks/RESULTS.md), XLA's buffers never get them. Linux 6.1+
can collapse a range of a live process's memory into huge pages on request
(madvise(MADV_COLLAPSE)): contents, addresses and sharing stay as they were, only the
page-table mapping changes, so nothing the arrays hold or how they are used changes.

Measured there (load 6-8, separate processes alternated, CPU time per step of a step's
one-row products chained, benchmarks/quantized_one_row_builds.py's arrays): bfloat16
23.7-24.1 -> 20.4-20.7 ms, GGUF Q4_1 8.4-8.6 -> 7.5 ms, per-channel int8 10.2-10.5 ->
9.5 ms.

Each 2 MiB region that an array touches is collapsed whole (the array's neighbours in the
same region come along: harmless, and at most one region of extra memory at each end).
MADV_COLLAPSE does not consult the sysfs THP settings: it collapses even where
`/sys/kernel/mm/transparent_hugepage/enabled` is `never`, and faults in any page of the
region not yet resident (so a region's untouched neighbour pages become memory). An admin's
`never` is therefore honoured here, by not asking at all. Where the kernel, the platform or
the memory at hand does not allow it (not Linux, a kernel before 6.1, no free huge page:
ENOMEM/EAGAIN), regions stay as they were: a hint, never an error.
Off unless XLA_INFERENCE_HUGE_PAGES=1: through the server (benchmarks/serving.py, batch 1,
idle, 2026-12-02) it made GGUF and int8 TPOT slower (13.3 -> 15.2 ms, 15.1 -> 18.1 ms;
bfloat16 26.5 -> 25.3 ms), against the engine-step figures above.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path

import jax

from xla_inference import envs

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_MADV_COLLAPSE = 25  # linux/mman.h (6.1+)


def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


_THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_enabled_text() -> str:
    """The sysfs THP setting as the kernel shows it (`always [madvise] never`); empty where
    the file is missing or unreadable."""
    try:
        return _THP_ENABLED.read_text()
    except OSError:
        return ""


def thp_turned_off() -> bool:
    """Whether transparent huge pages are set to `never`: MADV_COLLAPSE would ignore that,
    so the collapse is not asked for."""
    return "[never]" in _thp_enabled_text()


def host_regions(arrays) -> list[int]:
    """The start addresses of the 2 MiB regions that the host (CPU) buffers of `arrays`
    lie in, sorted; other devices' buffers are skipped."""
    regions = set()
    for a in arrays:
        if not isinstance(a, jax.Array):
            continue
        try:
            shards = [s.data for s in a.addressable_shards if s.device.platform == "cpu"]
        except ValueError:
            # JAX cannot list this array's shards (seen across two processes serving an
            # MoE model with data parallel: "an argument array had 2 shard(s)"); its pages
            # stay as they are (a hint, never an error).
            continue
        for data in shards:
            start = data.unsafe_buffer_pointer()
            end = start + data.nbytes
            regions.update(range(start // HUGE_PAGE * HUGE_PAGE, end, HUGE_PAGE))
    return sorted(regions)


def collapse(tree) -> tuple[int, int]:
    """Asks for the host buffers of every array in `tree` on huge pages; returns (regions
    collapsed, regions asked for). (0, 0) where turned off, not on Linux, or where THP is
    set to `never`."""
    if not envs.huge_pages_enabled() or not sys.platform.startswith("linux"):
        return 0, 0
    if thp_turned_off():
        logger.debug("xla-inference: transparent huge pages set to never; weights left as placed")
        return 0, 0
    regions = host_regions(jax.tree.leaves(tree))
    if not regions:
        return 0, 0
    jax.block_until_ready(jax.tree.leaves(tree))  # the buffers written before they move
    madvise = _madvise()
    done = sum(1 for r in regions if madvise(r, HUGE_PAGE, _MADV_COLLAPSE) == 0)
    logger.debug("xla-inference: %d of %d 2 MiB regions of the weights on huge pages",
                 done, len(regions))
    return done, len(regions)
