"""plugin/allocator.py: mimalloc is put first in LD_PRELOAD for the processes started after,
a user's own allocator or XLA_INFERENCE_MIMALLOC=0 leaves LD_PRELOAD as it was, and a
process started so runs on it (a JAX program included). No vLLM: the command-line front-end
calls it before vLLM loads. (The server's processes: tests/e2e/test_server_launcher.py.)"""

import os
import subprocess
import sys

import pytest

from xla_inference.plugin import allocator

LIBRARY = allocator.mimalloc_library()
needs_wheel = pytest.mark.skipif(LIBRARY is None or not sys.platform.startswith("linux"),
                                 reason="the cmeel-mimalloc wheel (Linux) is not installed")


@needs_wheel
def test_put_first_and_the_users_entries_kept(monkeypatch, tmp_path):
    own = str(tmp_path / "libown.so")
    monkeypatch.setenv("LD_PRELOAD", own)
    monkeypatch.delenv("XLA_INFERENCE_MIMALLOC", raising=False)
    assert allocator.preload_mimalloc() == LIBRARY
    assert os.environ["LD_PRELOAD"] == f"{LIBRARY}:{own}"
    assert allocator.preload_mimalloc() is None  # already there: not added twice
    assert os.environ["LD_PRELOAD"] == f"{LIBRARY}:{own}"


@needs_wheel
def test_alone_when_nothing_was_preloaded(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("XLA_INFERENCE_MIMALLOC", raising=False)
    assert allocator.preload_mimalloc() == LIBRARY
    assert os.environ["LD_PRELOAD"] == LIBRARY


@pytest.mark.parametrize("preloaded", ["/usr/lib/libtcmalloc_minimal.so.4",
                                       "/opt/lib/libjemalloc.so.2"])
def test_a_users_allocator_wins(monkeypatch, preloaded):
    monkeypatch.setenv("LD_PRELOAD", preloaded)
    assert allocator.preload_mimalloc() is None
    assert os.environ["LD_PRELOAD"] == preloaded


def test_turned_off(monkeypatch):
    monkeypatch.setenv("XLA_INFERENCE_MIMALLOC", "0")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert allocator.preload_mimalloc() is None
    assert "LD_PRELOAD" not in os.environ
    monkeypatch.setenv("XLA_INFERENCE_MIMALLOC", "yes")
    with pytest.raises(ValueError, match="XLA_INFERENCE_MIMALLOC must be 0 or 1"):
        allocator.preload_mimalloc()


def test_without_the_wheel(monkeypatch):
    monkeypatch.setattr(allocator, "mimalloc_library", lambda: None)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("XLA_INFERENCE_MIMALLOC", raising=False)
    assert allocator.preload_mimalloc() is None
    assert "LD_PRELOAD" not in os.environ


@needs_wheel
def test_a_process_started_after_runs_on_it(monkeypatch):
    """A child started with the environment maps the library, and malloc there is mimalloc's
    (the global symbol table's `malloc` is the library's own); a jitted JAX program runs."""
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("XLA_INFERENCE_MIMALLOC", raising=False)
    allocator.preload_mimalloc()
    child = ("import ctypes, jax, jax.numpy as jnp\n"
             "maps = open('/proc/self/maps').read()\n"
             "print('mapped', 'libmimalloc' in maps)\n"
             "address = lambda f: ctypes.cast(f, ctypes.c_void_p).value\n"
             f"own = ctypes.CDLL({LIBRARY!r})\n"
             "print('malloc is mimalloc', address(ctypes.CDLL(None).malloc) == address(own.malloc))\n"
             "x = jnp.arange(100.0)\n"
             "print('sum', float(jax.jit(lambda a: (a * a).sum())(x)))\n")
    out = subprocess.run([sys.executable, "-c", child], env=dict(os.environ), check=True,
                         capture_output=True, text=True, timeout=120).stdout.split("\n")
    assert "mapped True" in out
    assert "malloc is mimalloc True" in out
    assert f"sum {float(sum(i * i for i in range(100)))}" in out
