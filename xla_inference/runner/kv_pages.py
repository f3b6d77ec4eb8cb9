"""Copying token slots out of the paged KV cache to the host and back in, for KV transfer
between engines (kv_transfer/): jitted gather and scatter programs, one per bucket of slot
counts, compiled at warm-up. The cache is donated to every step and so moves; these
programs take it as an argument like the step does (never a raw pointer into it).

A slot is `page * block_size + offset` (kernels/metadata.py). A copy is padded up to a
bucket: a gather's padding reads slot 0 (the null page; dropped on the host), a scatter's
names a slot past the cache, whose write is dropped.

With data parallel replicas (runner/engine.py) each cache array is [replicas, slots of a
replica, kv heads, head size], split over the mesh's data axis, and page ids are global
(replica r owns pages [r * pages per replica, (r + 1) * pages per replica), as
plugin/dp_scheduler.py hands them out): slot s is row s % slots of a replica of replica
s // slots of a replica, so the same slot ids address either cache."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from xla_inference.kernels.metadata import KvCache

# Slots copied by one program call at most; longer copies run in chunks of this size.
MAX_SLOTS_PER_CALL = 2048
_MIN_BUCKET = 16
_DROPPED = np.iinfo(np.int32).max  # a scatter's padding slot: out of range, not written


def slot_buckets(max_slots: int) -> list[int]:
    """Powers of two from 16 up to the first that holds max_slots (capped at
    MAX_SLOTS_PER_CALL): the slot counts the copy programs are compiled for."""
    top = min(max(max_slots, 1), MAX_SLOTS_PER_CALL)
    buckets = [_MIN_BUCKET]
    while buckets[-1] < top:
        buckets.append(buckets[-1] * 2)
    return buckets


def token_slots(block_ids: list[int], block_size: int, start: int, end: int) -> np.ndarray:
    """The KV slots of tokens [start, end) of a sequence whose pages are `block_ids`."""
    positions = np.arange(start, end)
    pages = np.asarray(block_ids, np.int64)[positions // block_size]
    return (pages * block_size + positions % block_size).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class ArraySetLayout:
    """One set of cache arrays as a copy sees it: per token, num_arrays (K and V, or MLA's
    one latent array) rows of [num_kv_heads, head_size] in dtype."""

    num_arrays: int
    num_kv_heads: int
    head_size: int
    dtype: np.dtype


def cache_layout(kv_cache: KvCache) -> list[ArraySetLayout]:
    layouts = []
    for arrays in kv_cache.arrays:
        first = arrays[0]
        if first.ndim not in (3, 4):
            raise ValueError("KV transfer serves a cache of [slots, kv heads, head size] arrays "
                             "([replicas, slots, ...] with data parallel replicas); got shape "
                             f"{first.shape}")
        layouts.append(ArraySetLayout(len(arrays), first.shape[-2], first.shape[-1],
                                      np.dtype(first.dtype)))
    return layouts


def _rows(a, slots):
    """The index of global `slots` in cache array `a`: the slots themselves, or with data
    parallel replicas (a 4-D array) each slot's replica and its row there. A scatter's
    padding slot (_DROPPED) names a replica past the last, so its write is dropped too."""
    if a.ndim == 3:
        return slots
    per_replica = a.shape[1]
    return slots // per_replica, slots % per_replica


def _gather(arrays, slots):
    return jax.tree.map(lambda a: a[_rows(a, slots)], arrays)


def _scatter(arrays, slots, values):
    return jax.tree.map(lambda a, v: a.at[_rows(a, slots)].set(v, mode="drop"), arrays, values)


class PendingGather:
    """Gathered values on their way to the host: ready() without waiting, result() waits."""

    def __init__(self, layout: list[ArraySetLayout], parts: list):
        self.layout, self.parts = layout, parts

    def ready(self) -> bool:
        return all(leaf.is_ready() for _, chunk in self.parts for leaf in jax.tree.leaves(chunk))

    def result(self) -> list[tuple[np.ndarray, ...]]:
        """Per set of cache arrays, a tuple of [n, num_kv_heads, head_size] host arrays."""
        out = []
        for s, layout in enumerate(self.layout):
            out.append(tuple(
                np.concatenate([np.asarray(chunk[s][i])[:n] for n, chunk in self.parts])
                if self.parts else np.zeros((0, layout.num_kv_heads, layout.head_size),
                                            layout.dtype)
                for i in range(layout.num_arrays)))
        return out


class KvSlotCopier:
    """Gathers and scatters token slots of one engine's cache (its arrays' shapes and
    shardings fixed at construction). Values travel as, per set of cache arrays, a tuple of
    [n, num_kv_heads, head_size] arrays (K then V)."""

    def __init__(self, kv_cache: KvCache, max_slots: int):
        self.layout = cache_layout(kv_cache)
        self.buckets = slot_buckets(max_slots)
        shardings = [tuple(a.sharding for a in arrays) for arrays in kv_cache.arrays]
        self._gather = jax.jit(_gather)
        # The scattered cache keeps the step's shardings, so the next step takes it as is.
        self._scatter = jax.jit(_scatter, donate_argnums=(0,), out_shardings=shardings)

    def _chunks(self, n: int):
        """(start, stop, bucket) pieces of a copy of n slots."""
        step = self.buckets[-1]
        for start in range(0, n, step):
            stop = min(n, start + step)
            yield start, stop, next(b for b in self.buckets if b >= stop - start)

    @staticmethod
    def _padded(slots: np.ndarray, bucket: int, fill: int = 0) -> np.ndarray:
        padded = np.full(bucket, fill, np.int32)
        padded[:len(slots)] = slots
        return padded

    def gather(self, kv_cache: KvCache, slots: np.ndarray) -> list[tuple[np.ndarray, ...]]:
        """The values at `slots` of every cache array, on the host (waits for the device)."""
        return self.gather_async(kv_cache, slots).result()

    def gather_async(self, kv_cache: KvCache, slots: np.ndarray) -> PendingGather:
        """The gather of `slots`, dispatched with its copy to the host: it reads this
        version of the cache, so a later step may donate the cache meanwhile (JAX runs the
        gather before the donated buffers are reused)."""
        parts = []
        for start, stop, bucket in self._chunks(len(slots)):
            chunk = self._gather(kv_cache.arrays, self._padded(slots[start:stop], bucket))
            for leaf in jax.tree.leaves(chunk):
                leaf.copy_to_host_async()
            parts.append((stop - start, chunk))
        return PendingGather(self.layout, parts)

    def scatter(self, kv_cache: KvCache, slots: np.ndarray,
                values: list[tuple[np.ndarray, ...]]) -> KvCache:
        """kv_cache (donated) with `values` written at `slots`; dispatched, not waited on."""
        self.check_values(values, len(slots))
        arrays = kv_cache.arrays
        for start, stop, bucket in self._chunks(len(slots)):
            chunk = [tuple(self._padded_values(v[start:stop], bucket) for v in set_values)
                     for set_values in values]
            arrays = self._scatter(arrays, self._padded(slots[start:stop], bucket, _DROPPED),
                                   chunk)
        return dataclasses.replace(kv_cache, arrays=list(arrays))

    @staticmethod
    def _padded_values(values: np.ndarray, bucket: int) -> np.ndarray:
        padded = np.zeros((bucket, *values.shape[1:]), values.dtype)
        padded[:len(values)] = values
        return padded

    def check_values(self, values: list[tuple[np.ndarray, ...]], n: int) -> None:
        """Refuse values that do not fit this cache (another model, dtype or head layout)."""
        if len(values) != len(self.layout):
            raise ValueError(f"KV values for {len(values)} sets of cache arrays; this cache "
                             f"has {len(self.layout)}")
        for s, (set_values, layout) in enumerate(zip(values, self.layout)):
            want = (n, layout.num_kv_heads, layout.head_size)
            if len(set_values) != layout.num_arrays or any(
                    v.shape != want or v.dtype != layout.dtype for v in set_values):
                got = [(v.shape, str(v.dtype)) for v in set_values]
                raise ValueError(f"KV values of set {s} are {got}; this cache takes "
                                 f"{layout.num_arrays} x {want} {layout.dtype}")

    def warm_up(self, kv_cache: KvCache) -> KvCache:
        """Compile and run every bucket's gather and scatter once (the scatter writes
        nothing: every slot is padding); -> the cache, which the scatters donated."""
        for bucket in self.buckets:
            jax.block_until_ready(self._gather(kv_cache.arrays, np.zeros(bucket, np.int32)))
            slots = np.full(bucket, _DROPPED, np.int32)
            zeros = [tuple(np.zeros((bucket, s.num_kv_heads, s.head_size), s.dtype)
                           for _ in range(s.num_arrays)) for s in self.layout]
            kv_cache = dataclasses.replace(
                kv_cache, arrays=list(self._scatter(kv_cache.arrays, slots, zeros)))
        jax.block_until_ready(kv_cache.arrays)
        return kv_cache


class EnginePages:
    """A ModelEngine's cache as KV transfer reads and writes it: slots of its current cache
    (the engine replaces its cache every step)."""

    def __init__(self, engine):
        if getattr(engine, "stages", 1) > 1:
            # The cache is [stages * slots] (per replica) with pipeline stages; our slot
            # arithmetic reads one stage's slots and would copy into another stage's pages.
            raise NotImplementedError("KV transfer with pipeline stages")
        self.engine = engine
        self.block_size = engine.cfg.block_size
        self.copier = KvSlotCopier(engine.kv_cache, engine.cfg.max_model_len)

    @property
    def layout(self) -> list[ArraySetLayout]:
        return self.copier.layout

    def read_tokens(self, block_ids: list[int], start: int, end: int
                    ) -> list[tuple[np.ndarray, ...]]:
        """Tokens [start, end) of a sequence in pages `block_ids`, on the host."""
        slots = token_slots(block_ids, self.block_size, start, end)
        return self.copier.gather(self.engine.kv_cache, slots)

    def read_tokens_async(self, block_ids: list[int], start: int, end: int) -> PendingGather:
        """Tokens [start, end) of a sequence in pages `block_ids`, dispatched to the host."""
        slots = token_slots(block_ids, self.block_size, start, end)
        return self.copier.gather_async(self.engine.kv_cache, slots)

    def write_tokens(self, block_ids: list[int], start: int, end: int,
                     values: list[tuple[np.ndarray, ...]]) -> None:
        """Write tokens [start, end) of a sequence in pages `block_ids` (dispatched)."""
        slots = token_slots(block_ids, self.block_size, start, end)
        self.engine.kv_cache = self.copier.scatter(self.engine.kv_cache, slots, values)

    def warm_up(self) -> None:
        self.engine.kv_cache = self.copier.warm_up(self.engine.kv_cache)


class ReplicaPages:
    """One data parallel replica's share of an EnginePages, in that replica's own page ids
    (its scheduler's, 0 .. pages per replica - 1), which become the engine's by adding
    the replica's first page: what a KV connector's worker side for that replica copies
    (kv_transfer/replicas.py)."""

    def __init__(self, pages: EnginePages, first_page: int):
        self.pages, self.first_page = pages, first_page
        self.block_size = pages.block_size

    @property
    def layout(self) -> list[ArraySetLayout]:
        return self.pages.layout

    def _engine_pages(self, block_ids: list[int]) -> list[int]:
        return [b + self.first_page for b in block_ids]

    def read_tokens(self, block_ids: list[int], start: int, end: int
                    ) -> list[tuple[np.ndarray, ...]]:
        return self.pages.read_tokens(self._engine_pages(block_ids), start, end)

    def read_tokens_async(self, block_ids: list[int], start: int, end: int) -> PendingGather:
        return self.pages.read_tokens_async(self._engine_pages(block_ids), start, end)

    def write_tokens(self, block_ids: list[int], start: int, end: int,
                     values: list[tuple[np.ndarray, ...]]) -> None:
        self.pages.write_tokens(self._engine_pages(block_ids), start, end, values)
