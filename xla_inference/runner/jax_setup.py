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
