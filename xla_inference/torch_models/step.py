"""The step being traced on the torch path, and the torch <-> JAX views, without vLLM (so
that the layers replacing vLLM's forwards can be exercised alone): the cache and metadata
beside the module's forward (`step_context`: the module is called with torch arguments
only), and the step's real tokens (AttentionMetadata.real_tokens) for the MoE forward."""

from __future__ import annotations

import contextlib
import dataclasses
import threading

from xla_inference.kernels.metadata import AttentionMetadata, KvCache
from xla_inference.torch_models.torchax_compat import import_torchax

torchax = import_torchax()
from torchax.interop import jax_view, torch_view  # noqa: E402 (after the shimmed import)


def from_torch(value):
    """torchax tensors (and dtypes) in a pytree -> JAX arrays (dtypes), without copies."""
    return jax_view(value)


def to_torch(value):
    """JAX arrays in a pytree -> torchax tensors, without copies."""
    return torch_view(value)


@dataclasses.dataclass
class _Step:
    """The cache and metadata of the step being traced; layers replace the cache as they go."""

    kv_cache: KvCache
    metadata: AttentionMetadata
    segments: object = None  # [T] each token's request row, -1 padding (encoder-only layers)


_current = threading.local()


@contextlib.contextmanager
def step_context(kv_cache: KvCache, metadata: AttentionMetadata, segments=None):
    """While the module's forward is traced: the cache and metadata attention reads (the
    module is called with torch arguments only, so these travel beside it)."""
    step = _Step(kv_cache, metadata, segments)
    _current.step = step
    try:
        yield step
    finally:
        _current.step = None


def step_real_tokens(num_tokens: int):
    """[T] bool, the traced step's tokens that are not its padding
    (AttentionMetadata.real_tokens), for a layer handed `num_tokens` rows; None outside a
    step, or where the rows are not the step's tokens (every row then counts as real)."""
    step = getattr(_current, "step", None)
    if step is None or step.metadata.num_tokens != num_tokens:
        return None
    return step.metadata.real_tokens()
