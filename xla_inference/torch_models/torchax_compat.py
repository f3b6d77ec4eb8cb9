"""Importing torchax 0.0.13 on the torch that vLLM 0.32 pins (2.13).

torchax's op tables (torchax/amp.py at import, torchax/decompositions.py when its
environment is built) name op overloads that torch 2.13 removed: named-dimension variants
(`aten.prod.dim_Dimname`, `aten.all.dimname`, `aten.norm.names_*`, ...) that no language
model calls. Looking one up raises AttributeError and the import fails. While torchax
imports and builds its environment, and only then, a lookup of a removed named-dimension
overload returns a placeholder key that no op ever dispatches to; every other lookup is
torch's own.
The placeholders are recorded (`tolerated_overloads`) so that a test sees when a torch or
torchax upgrade makes the shim unnecessary."""

from __future__ import annotations

import contextlib
import importlib
import sys

import torch._ops

# Named-dimension overloads: their names carry the dimension-name variant's marker.
_NAMED_DIMENSION_MARKERS = ("dimname", "names")

tolerated_overloads: list[str] = []


class RemovedOverload:
    """Stands for an overload torch no longer has: hashable and unique per name, so that
    torchax's tables keep one harmless entry for it; never called."""

    def __init__(self, qualified_name: str):
        self.qualified_name = qualified_name

    def __repr__(self):
        return f"RemovedOverload({self.qualified_name})"

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.qualified_name} does not exist in torch {torch.__version__}")


def is_named_dimension_overload(name: str) -> bool:
    return any(marker in name.lower() for marker in _NAMED_DIMENSION_MARKERS)


@contextlib.contextmanager
def _tolerate_removed_named_dimension_overloads():
    packet = torch._ops.OpOverloadPacket
    original = packet.__getattr__

    def lookup(self, key):
        try:
            return original(self, key)
        except AttributeError:
            if not is_named_dimension_overload(key):
                raise
            name = f"{self._qualified_op_name}.{key}"
            tolerated_overloads.append(name)
            return RemovedOverload(name)

    packet.__getattr__ = lookup
    try:
        yield
    finally:
        packet.__getattr__ = original


def import_torchax():
    """torchax, imported once with the shim above, its default environment built (which
    imports its op tables: torchax/ops/, torchax/decompositions.py); the torchax module."""
    if "torchax" in sys.modules:
        return sys.modules["torchax"]
    with _tolerate_removed_named_dimension_overloads():
        torchax = importlib.import_module("torchax")
        torchax.default_env()
    _no_torch_cache_to_empty_on_jax()
    return torchax


def _no_torch_cache_to_empty_on_jax() -> None:
    """torchax names torch's PrivateUse1 device "jax", which torch then reports as its
    current accelerator, with no caching allocator behind it; torch.accelerator.empty_cache()
    then fails an internal assert ("Allocator for jax is not a DeviceAllocator") in any
    process that imported torchax. vLLM's engine shutdown calls it
    (cleanup_dist_env_and_memory), so an engine core in the caller's process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0) raised at shutdown once the torch path had been
    loaded there. JAX, not torch, holds that device's memory: for it the call does nothing."""
    import torch.accelerator

    original = torch.accelerator.empty_cache  # wrapped once: import_torchax runs this once

    def empty_cache() -> None:
        current = torch.accelerator.current_accelerator()
        if current is None or current.type != "jax":
            original()

    torch.accelerator.empty_cache = empty_cache
