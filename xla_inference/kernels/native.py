"""Native C++ kernels for XLA's CPU backend: compile a kernel's source on first use, cache the
library, and register its handlers as XLA FFI targets.

Each kernel is one C++ file under kernels/cpu/ that includes XLA's FFI headers (shipped with
jaxlib) and the headers beside it, and exports handler symbols (XLA_FFI_DEFINE_HANDLER_SYMBOL).
It is compiled with the machine's C++ compiler (a few seconds) into
~/.cache/xla-inference/kernels, or $XLA_INFERENCE_CACHE/kernels, under a name keyed by the
source and the headers beside it, the flags, the CPU's features and the JAX version, so that a
changed source, another machine sharing the cache, or a JAX with another FFI gets its own
build. Concurrent processes may build the same library at once:
each writes a temporary file and renames it into place.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax

from xla_inference import envs
from xla_inference.kernels import host_cpu

logger = logging.getLogger(__name__)

# -march=native: the library is built on (and keyed by) the CPU that runs it. Compiled
# with -ffast-math but linked without it: linking a shared library with -ffast-math adds
# GCC's crtfastmath.o, whose constructor turns on flush-to-zero for the whole process when
# the library loads (numpy's float32 denormals then read as 0).
DEFAULT_FLAGS = ("-std=c++17", "-O3", "-march=native", "-ffast-math", "-fPIC")
_LINK_FLAGS = ("-shared", "-fPIC")


def has_bfloat16_dot() -> bool:
    """Whether the host CPU has native bfloat16 dot products (avx512_bf16), on which XLA's
    CPU backend runs its bfloat16 x bfloat16 -> float32 products."""
    return "avx512_bf16" in host_cpu.flags()


def _cpu_signature() -> str:
    return platform.machine() + " ".join(sorted(host_cpu.flags()))


@functools.cache
def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) found")
    return compiler


@functools.cache
def _compiler_flags(compiler: str) -> tuple[str, ...]:
    """-mno-recip for GCC on x86: its -ffast-math, tuned for CPUs without AVX-512 (Zen 3),
    turns a vector division into a reciprocal estimate plus one Newton step (1 / 2 =
    0.49999997), so a softmax over equal scores no longer gives each key exactly 1/n.
    Clang has no such flag and makes no such estimate unless asked (-mrecip)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 check=False).stdout
    except OSError:
        return ()
    return () if "clang" in version.lower() else ("-mno-recip",)


def _cache_dir() -> Path:
    return envs.cache_root() / "kernels"


def build_library(sources: Path | Sequence[Path], flags: Sequence[str] = DEFAULT_FLAGS) -> Path:
    """The compiled shared library of `sources` (one C++ file, or several linked into one
    library), built if absent (RuntimeError if it cannot be: no compiler, or a compile
    error, whose output the message ends with)."""
    sources = (sources,) if isinstance(sources, Path) else tuple(sources)
    # The key covers the headers next to the sources (work_items.h, which every kernel
    # includes), so that a changed header gets a new build too.
    headers = b"".join(h.read_bytes() for h in sorted(sources[0].parent.glob("*.h")))
    compiler = _compiler()
    flags = (*flags, *_compiler_flags(compiler))
    key = hashlib.sha256(b"".join(s.read_bytes() for s in sources) + headers
                         + " ".join(flags).encode() + _cpu_signature().encode()
                         + jax.__version__.encode()).hexdigest()[:16]
    path = _cache_dir() / f"{'+'.join(s.stem for s in sources)}-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".so", delete=False) as tmp:
        partial = tmp.name
    objects = [f"{partial}.{i}.o" for i in range(len(sources))]
    try:
        _compile_all(compiler, flags, sources, objects)
        subprocess.run([compiler, *_LINK_FLAGS, *objects, "-o", partial, "-lpthread"],
                       check=True, capture_output=True, text=True)
        os.replace(partial, path)
    except subprocess.CalledProcessError as e:
        names = ", ".join(s.name for s in sources)
        raise RuntimeError(f"compiling {names} failed:\n{e.stderr[-2000:]}") from e
    finally:
        for leftover in (partial, *objects):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return path


def _compile_all(compiler: str, flags: Sequence[str], sources: Sequence[Path],
                 objects: Sequence[str]) -> None:
    """Each source compiled into its object, all at once (a library of several kernels
    then takes about its largest one's time); CalledProcessError for the first that fails."""
    runs = []
    try:
        for source, obj in zip(sources, objects):
            runs.append(subprocess.Popen(
                [compiler, *flags, "-I", jax.ffi.include_dir(), "-c", str(source), "-o", obj],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [run.communicate() for run in runs]
    except BaseException:  # (a compiler that cannot start, an interrupt): none left running
        for run in runs:
            run.kill()
            run.wait()
        raise
    for source, run, (out, err) in zip(sources, runs, outputs):
        if run.returncode != 0:
            raise subprocess.CalledProcessError(run.returncode, run.args, out,
                                                f"{source.name}:\n{err}")


def load_targets(sources: Path | Sequence[Path], targets: Mapping[str, str],
                 flags: Sequence[str] = DEFAULT_FLAGS) -> ctypes.CDLL:
    """Builds (or finds) the library of `sources` (build_library), loads it and registers
    each handler symbol as a CPU FFI target: targets maps target name -> exported symbol.
    Loading the same build again gives the library already loaded. Raises on any failure."""
    library = ctypes.cdll.LoadLibrary(str(build_library(sources, flags)))
    for target, symbol in targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    return library


def loads(load: Callable[[], object], kernel: str, instead: str) -> bool:
    """Whether load() builds and registers `kernel`'s library; where it fails (any error),
    False, with a warning naming what its callers run instead."""
    try:
        load()
    except Exception as e:  # noqa: BLE001 - any failure means the callers' fallback
        logger.warning("xla-inference: native CPU %s unavailable, using %s: %s", kernel, instead, e)
        return False
    return True


# The spare core (cpu/spare_core.h: a helper thread that shares a decode step's short
# products), which every build of a kernel that uses it links (its exported functions).
SPARE_CORE = Path(__file__).parent / "cpu" / "spare_core.cc"
# The kernels that share the spare core, built into one library: one helper thread in the
# process, not one per kernel (two helpers, each spinning at SCHED_IDLE on the second core,
# halve each other when a step runs both kernels: AWQ's int4 projections and its bfloat16
# LM head). Other builds of one of them (tests, benchmarks) link SPARE_CORE and that kernel.
SPARE_CORE_KERNELS = tuple(Path(__file__).parent / "cpu" / name for name in (
    "spare_core.cc", "dense_matvec.cc", "quantized_matmul.cc", "paged_attention.cc"))


def load_spare_core_kernel(own_sources: Sequence[Path], targets: Mapping[str, str]
                           ) -> ctypes.CDLL:
    """One kernel's targets from the SPARE_CORE_KERNELS library, its spare core on or off as
    XLA_INFERENCE_SPARE_CORE says; where that library does not build (another kernel of it
    fails on this compiler), from the kernel's own build (own_sources: SPARE_CORE and the
    kernel), which then has a helper thread of its own. Raises if that fails too."""
    together = _built_together(SPARE_CORE_KERNELS)
    library = load_targets(SPARE_CORE_KERNELS if together else own_sources, targets)
    library.XlaInferenceUseSpareCore(int(envs.spare_core_enabled()))
    return library


@functools.cache
def _built_together(sources: tuple[Path, ...]) -> bool:
    """Whether `sources` build into one library: tried once a process (each kernel that
    loads from it asks), the failure logged once."""
    try:
        build_library(sources)
    except RuntimeError as e:
        logger.warning("xla-inference: the kernels sharing the spare core did not build "
                       "together, each is built alone: %s", e)
        return False
    return True


def spare_core_items(library: ctypes.CDLL) -> tuple[int, int]:
    """(items the library's spare core's helper finished, items taken back from it) since
    the library was loaded. For tests and benchmarks."""
    library.XlaInferenceSpareCoreItems.restype = ctypes.c_int64
    return library.XlaInferenceSpareCoreItems(0), library.XlaInferenceSpareCoreItems(1)
