"""Process-wide JAX settings: the persistent compilation cache."""

from pathlib import Path

import jax

from xla_inference.envs import cache_root


def default_cache_dir() -> Path:
    return cache_root() / "jax-compilation-cache"


def configure_jax() -> list:
    """Turn on the persistent compilation cache (restarts skip XLA compiles); return devices."""
    cache_dir = default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    # Cache every program, however quick to compile: warm-up compiles many small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return jax.devices()


def join_processes(coordinator: str, num_processes: int, process_id: int,
                   timeout_s: float) -> None:
    """Join this process to a multi-host JAX program (jax.distributed): afterwards
    jax.devices() lists every process's devices, a mesh over them spans the hosts, and each
    process places and runs only its own devices' shards. On the CPU, programs that cross
    processes need JAX's CPU collectives (gloo over TCP); accelerators use their own. Must
    run before anything touches a JAX backend."""
    if jax.distributed.is_initialized():
        return
    if _runs_on_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Its SIGTERM handler would swallow the signal vLLM stops its engine core with.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=int(timeout_s))


def _runs_on_cpu() -> bool:
    """JAX's platform, read from the configuration without starting a backend."""
    platforms = jax.config.jax_platforms or ""
    return platforms.split(",")[0].strip() == "cpu" or not platforms and not _has_accelerator()


def _has_accelerator() -> bool:
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel*")
                or glob.glob("/dev/vfio/[0-9]*"))


def wait_for_other_processes(name: str, timeout_s: float) -> None:
    """A barrier of every JAX process (no-op in a single one). Before the first program that
    crosses processes: gloo gives a peer 30 s to arrive at a collective, and one process can
    be minutes behind another after compiling (its persistent cache missed where the other's
    hit: JAX writes the cache from process 0 only)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(f"xla-inference:{name}",
                                                    int(timeout_s * 1000))
