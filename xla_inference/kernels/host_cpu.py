"""The host CPU's feature flags, read once. Imports nothing (no JAX): the platform plugin,
which vLLM loads before JAX, reads them too."""

import functools


@functools.cache
def flags() -> frozenset[str]:
    """The host CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())
