"""Counts XLA executables built in this process (fresh compiles and persistent-cache loads),
and logs each one built after the engine's warm-up: serving should never compile, and a
server log (benchmarks/serving.py counts the lines) shows when it did."""

import logging
import threading

import jax

logger = logging.getLogger(__name__)
AFTER_WARM_UP = "xla-inference: XLA built a program after warm-up"

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_count = 0
_installed = False
_warm_at: int | None = None  # the count when warm-up finished


def _on_event(event: str, duration: float, **kwargs) -> None:
    global _count
    if event == _BACKEND_COMPILE_EVENT:
        with _lock:
            _count += 1
            after = None if _warm_at is None else _count - _warm_at
        if after is not None:
            logger.warning("%s (%d so far): a shape no bucket covers", AFTER_WARM_UP, after)


def install() -> None:
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _installed = True


def num_compilations() -> int:
    return _count


def mark_warm(done: bool = True) -> None:
    """Warm-up is done (log every program built from now on), or starts again (done=False:
    another engine in this process is warming up; its programs are expected)."""
    global _warm_at
    with _lock:
        _warm_at = _count if done else None
