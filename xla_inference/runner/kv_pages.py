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
s // slots of a replica, so the same slot ids address either cache.

Across several JAX processes (distributed/multihost.py) no process can read a whole page: each
holds its devices' KV heads of every slot. ProcessSlotCopier copies only those, by programs
on each local shard (none spans processes, so the processes need not copy in step), and
ProcessShare names which heads they are, for the connectors to record and check."""

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


def _on_host(value) -> np.ndarray:
    """A gathered array on the host; a list of them (a process's shards, each a range of
    KV heads: ProcessSlotCopier) joined along the heads."""
    if isinstance(value, list):
        return np.concatenate([np.asarray(v) for v in value], axis=1)
    return np.asarray(value)


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
                np.concatenate([_on_host(chunk[s][i])[:n] for n, chunk in self.parts])
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
            chunk = self._gather_chunk(kv_cache, self._padded(slots[start:stop], bucket))
            for leaf in jax.tree.leaves(chunk):
                leaf.copy_to_host_async()
            parts.append((stop - start, chunk))
        return PendingGather(self.layout, parts)

    def _gather_chunk(self, kv_cache: KvCache, padded: np.ndarray):
        return self._gather(kv_cache.arrays, padded)

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


@dataclasses.dataclass(frozen=True)
class ProcessShare:
    """The part of every cache array one JAX process holds when the engine spans several:
    per set of cache arrays, KV heads [first, stop) of `total` (tensor parallel splits the
    heads over the mesh's model axis; a process holds its devices' heads, every slot of
    them). What a KV connector records beside the values it writes, and checks on read: a
    process of another layout holds other heads."""

    process_index: int
    process_count: int
    heads: tuple[tuple[int, int, int], ...]  # per set: first, stop, total

    def describe(self) -> str:
        ranges = ", ".join(f"[{a}, {b}) of {t}" for a, b, t in self.heads)
        return (f"process {self.process_index} of {self.process_count} (KV heads "
                f"{ranges} of each cache set)")


def _slice_bounds(index: slice, size: int) -> tuple[int, int]:
    first, stop, step = index.indices(size)
    if step != 1:
        raise ValueError(f"a cache shard of stride {step}")
    return first, stop


class ProcessSlotCopier(KvSlotCopier):
    """KvSlotCopier over only this process's shards of each cache array: every gather and
    scatter is a program on one local device's shard (no program spans processes, so
    processes copy independently of each other, each its own KV heads). Values travel as
    in KvSlotCopier, with this process's heads: [n, heads held, head size]. `owns`: which
    devices are this process's and `process` its (index, count) (tests; default:
    jax.process_index()'s devices, of jax.process_count())."""

    def __init__(self, kv_cache: KvCache, max_slots: int, owns=None,
                 process: tuple[int, int] | None = None):
        if owns is None:
            own = jax.process_index()
            owns = lambda device: device.process_index == own  # noqa: E731
        self.owns = owns
        self.buckets = slot_buckets(max_slots)
        heads, layout = [], []
        for arrays in kv_cache.arrays:
            ranges = {self._ranges(a) for a in arrays}
            if len(ranges) != 1:
                raise ValueError("KV transfer across processes: the arrays of one cache set "
                                 f"are split differently ({sorted(ranges)})")
            first, stop, total = ranges.pop()
            heads.append((first, stop, total))
            layout.append(ArraySetLayout(len(arrays), stop - first, arrays[0].shape[-1],
                                         np.dtype(arrays[0].dtype)))
        self.layout = layout
        index, count = process or (jax.process_index(), jax.process_count())
        self.share = ProcessShare(index, count, tuple(heads))
        self._gather_one = jax.jit(lambda a, slots: a[slots])
        self._scatter_one = jax.jit(lambda a, slots, v: a.at[slots].set(v, mode="drop"),
                                    donate_argnums=(0,))

    def _own_shards(self, a) -> list:
        return [sh for sh in a.addressable_shards if self.owns(sh.device)]

    def _ranges(self, a) -> tuple[int, int, int]:
        """The KV heads [first, stop) of `total` this process's shards of `a` hold."""
        if a.ndim != 3:
            raise NotImplementedError(
                "KV transfer across several JAX processes serves a cache of [slots, kv heads, "
                f"head size] arrays; got shape {a.shape} (data parallel replicas)")
        spans = set()
        for sh in self._own_shards(a):
            slots, head_size = (_slice_bounds(sh.index[0], a.shape[0]),
                                _slice_bounds(sh.index[2], a.shape[2]))
            if slots != (0, a.shape[0]) or head_size != (0, a.shape[2]):
                raise NotImplementedError(f"KV transfer across processes: a cache shard "
                                          f"{sh.index} split other than by KV heads")
            spans.add(_slice_bounds(sh.index[1], a.shape[1]))
        spans = sorted(spans)
        if not spans:
            raise ValueError("KV transfer across processes: this process holds no shard of "
                             "the cache")
        for (_, stop), (first, _) in zip(spans, spans[1:]):
            if first != stop:
                raise NotImplementedError(f"KV transfer across processes: this process holds "
                                          f"KV heads {spans}, not one contiguous range")
        return spans[0][0], spans[-1][1], a.shape[1]

    def _distinct(self, a) -> list:
        """One own shard per range of heads (replicas of a range on several devices hold
        the same values), in head order."""
        by_range = {}
        for sh in self._own_shards(a):
            by_range.setdefault(_slice_bounds(sh.index[1], a.shape[1]), sh)
        return [by_range[r] for r in sorted(by_range)]

    def _gather_chunk(self, kv_cache: KvCache, padded: np.ndarray):
        """This process's own shards of each array (one per distinct head range)."""
        return [tuple([self._gather_one(sh.data, padded) for sh in self._distinct(a)]
                      for a in arrays) for arrays in kv_cache.arrays]

    def scatter(self, kv_cache: KvCache, slots: np.ndarray,
                values: list[tuple[np.ndarray, ...]]) -> KvCache:
        """kv_cache (donated) with `values` (this process's heads) written at `slots` in
        every own shard; other processes' shards untouched."""
        self.check_values(values, len(slots))
        chunks = [(self._padded(slots[start:stop], bucket, _DROPPED), start, stop, bucket)
                  for start, stop, bucket in self._chunks(len(slots))]
        arrays = []
        for (first, _, _), set_arrays, set_values in zip(self.share.heads, kv_cache.arrays,
                                                         values):
            arrays.append(tuple(self._scatter_array(a, v, first, chunks)
                                for a, v in zip(set_arrays, set_values)))
        return dataclasses.replace(kv_cache, arrays=arrays)

    def _scatter_array(self, a, values: np.ndarray, first: int, chunks):
        shards = []
        for sh in a.addressable_shards:
            data = sh.data
            if self.owns(sh.device):
                lo, hi = _slice_bounds(sh.index[1], a.shape[1])
                for padded, start, stop, bucket in chunks:
                    part = self._padded_values(values[start:stop, lo - first:hi - first],
                                               bucket)
                    data = self._scatter_one(data, padded, part)
            shards.append(data)
        return jax.make_array_from_single_device_arrays(a.shape, a.sharding, shards)

    def warm_up(self, kv_cache: KvCache) -> KvCache:
        """Compile every bucket's gather and scatter on every own shard (the scatter writes
        nothing: every slot is padding)."""
        for bucket in self.buckets:
            slots = np.zeros(bucket, np.int32)
            for arrays in kv_cache.arrays:
                for a in arrays:
                    for sh in self._own_shards(a):
                        jax.block_until_ready(self._gather_one(sh.data, slots))
            zeros = [tuple(np.zeros((bucket, s.num_kv_heads, s.head_size), s.dtype)
                           for _ in range(s.num_arrays)) for s in self.layout]
            chunks = [(np.full(bucket, _DROPPED, np.int32), 0, bucket, bucket)]
            kv_cache = dataclasses.replace(kv_cache, arrays=[
                tuple(self._scatter_array(a, z, first, chunks) for a, z in zip(arrays, set_zeros))
                for (first, _, _), arrays, set_zeros in zip(self.share.heads, kv_cache.arrays,
                                                            zeros)])
        jax.block_until_ready(kv_cache.arrays)
        return kv_cache


class EnginePages:
    """A ModelEngine's cache as KV transfer reads and writes it: slots of its current cache
    (the engine replaces its cache every step)."""

    def __init__(self, engine, owns=None, process: tuple[int, int] | None = None):
        """`owns` and `process` (tests): copy only the shards on the devices `owns`
        accepts, as process (index, count) of several would."""
        if getattr(engine, "stages", 1) > 1:
            # The cache is [stages * slots] (per replica) with pipeline stages; our slot
            # arithmetic reads one stage's slots and would copy into another stage's pages.
            raise NotImplementedError("KV transfer with pipeline stages")
        self.engine = engine
        self.block_size = engine.cfg.block_size
        if jax.process_count() > 1 or owns is not None:  # each process its own KV heads
            self.copier = ProcessSlotCopier(engine.kv_cache, engine.cfg.max_model_len, owns,
                                            process)
        else:
            self.copier = KvSlotCopier(engine.kv_cache, engine.cfg.max_model_len)

    @property
    def layout(self) -> list[ArraySetLayout]:
        """What read_tokens returns and write_tokens takes: this process's heads."""
        return self.copier.layout

    @property
    def share(self) -> ProcessShare | None:
        """This process's part of each page across several JAX processes; None in one."""
        return getattr(self.copier, "share", None)

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

    @property
    def share(self) -> ProcessShare | None:
        return self.pages.share

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
