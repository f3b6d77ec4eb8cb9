"""KV connectors across several JAX processes, each holding its devices' KV heads of every
page (runner/kv_pages.ProcessSlotCopier): two "processes" simulated on one, each copying only
the shards on its own virtual devices of a cache split over the model axis as the engine
splits it. Against a numpy reference of the cache:

- each process reads its heads of a prompt's pages; side by side they are the one-process
  pages; each process's write lands in its heads only, and both writes make the whole pages;
- shared storage: one file per process with its share in the header; read back, the files
  are the one-process pages; a reader of another layout is refused naming both layouts;
- offload: each process's host tier holds its heads and restores them bit for bit.
The driver's join of the processes' step outputs: tests/kv_transfer/test_process_outputs.py."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xla_inference.kernels.metadata import KvCache
from xla_inference.kv_transfer import storage
from xla_inference.kv_transfer.host_tier import HostPageStore
from xla_inference.runner.kv_pages import EnginePages, ProcessShare, token_slots

BLOCK = 4
PAGES = 8
HEADS, HEAD_SIZE = 4, 8


def _engine(rng, tp: int):
    """An engine stand-in whose cache (K and V float32, one bfloat16 set) is split over tp
    devices by KV heads, and the cache's values on the host ([slots, heads, head size])."""
    mesh = Mesh(np.asarray(jax.devices()[:tp]), ("model",))
    sharding = NamedSharding(mesh, PartitionSpec(None, "model"))
    shape = (PAGES * BLOCK, HEADS, HEAD_SIZE)
    host = [tuple(rng.standard_normal(shape).astype(np.float32) for _ in range(2)),
            (rng.standard_normal(shape).astype(jnp.bfloat16),)]
    cache = KvCache([tuple(jax.device_put(a, sharding) for a in s) for s in host], (0, 1),
                    (0, 0))
    engine = SimpleNamespace(kv_cache=cache, cfg=SimpleNamespace(block_size=BLOCK,
                                                                 max_model_len=16))
    return engine, host, sharding


def _processes(engine, tp: int) -> list[EnginePages]:
    """Two processes' pages over one engine: process p holds devices [p * tp/2, (p+1) * tp/2)."""
    per = tp // 2
    ids = [d.id for d in jax.devices()[:tp]]
    return [EnginePages(engine, owns=lambda d, p=p: d.id in ids[p * per:(p + 1) * per],
                        process=(p, 2)) for p in range(2)]


def _device(engine):
    return [tuple(np.asarray(a) for a in s) for s in engine.kv_cache.arrays]


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _equal(a, b) -> None:
    np.testing.assert_array_equal(_bits(np.ascontiguousarray(a)), _bits(np.ascontiguousarray(b)))


def _joined(per_process) -> list[tuple[np.ndarray, ...]]:
    """Two processes' values of the same tokens side by side (their heads in order)."""
    return [tuple(np.concatenate(parts, axis=1) for parts in zip(*sets))
            for sets in zip(*per_process)]


@pytest.mark.parametrize("tp", [2, 4])
def test_each_process_copies_its_own_heads_and_together_they_are_the_whole_pages(tp):
    engine, host, sharding = _engine(np.random.default_rng(3), tp)
    procs = _processes(engine, tp)
    assert [p.share for p in procs] == [ProcessShare(0, 2, ((0, 2, 4),) * 2),
                                        ProcessShare(1, 2, ((2, 4, 4),) * 2)]
    assert [(s.num_arrays, s.num_kv_heads) for s in procs[0].layout] == [(2, 2), (1, 2)]
    for p in procs:
        p.warm_up()
    src, dst = [5, 1], [2, 6]
    slots, dst_slots = token_slots(src, BLOCK, 0, 7), token_slots(dst, BLOCK, 0, 7)
    values = [p.read_tokens(src, 0, 7) for p in procs]
    whole = _joined(values)
    for h, w in zip([a for s in host for a in s], [a for s in whole for a in s]):
        _equal(w, h[slots])
    # The one-process copier reads the same pages.
    for w, o in zip(whole, EnginePages(engine).read_tokens(src, 0, 7)):
        for a, b in zip(w, o):
            _equal(a, b)

    procs[0].write_tokens(dst, 0, 7, values[0])  # process 0's heads only
    half = _device(engine)
    untouched = np.setdiff1d(np.arange(PAGES * BLOCK), dst_slots)
    for h, d in zip([a for s in host for a in s], [a for s in half for a in s]):
        _equal(d[dst_slots, :2], h[slots, :2])
        _equal(d[dst_slots, 2:], h[dst_slots, 2:])  # process 1's shards not written
        _equal(d[untouched], h[untouched])
    procs[1].write_tokens(dst, 0, 7, values[1])
    for h, d in zip([a for s in host for a in s], [a for s in _device(engine) for a in s]):
        _equal(d[dst_slots], h[slots])
        _equal(d[untouched], h[untouched])
    assert all(a.sharding == sharding for s in engine.kv_cache.arrays for a in s)


def test_shared_storage_files_per_process_hold_the_pages_and_refuse_another_layout(tmp_path):
    engine, host, _ = _engine(np.random.default_rng(4), 2)
    procs = _processes(engine, 2)
    src = [3, 0, 7]
    slots = token_slots(src, BLOCK, 0, 11)
    key = storage.prompt_key("model", list(range(11)))
    assert not storage.is_stored(tmp_path, key, 2)
    storage.save(storage.path_for(tmp_path, key, procs[0].share), procs[0].read_tokens(src, 0, 11),
                 procs[0].share)
    assert not storage.is_stored(tmp_path, key, 2)  # process 1's file still missing
    storage.save(storage.path_for(tmp_path, key, procs[1].share), procs[1].read_tokens(src, 0, 11),
                 procs[1].share)
    assert storage.is_stored(tmp_path, key, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.p0of2.kv.npz",
                                                          f"{key}.p1of2.kv.npz"]
    # Tokens [2, 9) read back by each process: side by side, the one-process pages.
    loaded = [storage.load(storage.path_for(tmp_path, key, p.share), p.layout, 2, 9, p.share)
              for p in procs]
    for h, w in zip([a for s in host for a in s], [a for s in _joined(loaded) for a in s]):
        _equal(w, h[slots[2:9]])

    # A one-process engine finds the prompt (so its load is tried, not silently skipped)
    # and is refused naming both layouts.
    assert storage.is_stored(tmp_path, key, 1)
    whole_layout = EnginePages(engine).layout
    with pytest.raises(ValueError, match=r"another layout \(process 0 of 2 \(KV heads \[0, 2\) "
                                         r"of 4.*process 1 of 2.*this reader is one process"):
        storage.load(storage.path_for(tmp_path, key), whole_layout, 0, 11)
    # A process of a two-process engine whose processes hold other heads.
    other = ProcessShare(0, 2, ((0, 1, 2),) * 2)
    with pytest.raises(ValueError, match=r"written by process 0 of 2 \(KV heads \[0, 2\) of 4, "
                                         r"\[0, 2\) of 4.*this reader is process 0 of 2 \(KV "
                                         r"heads \[0, 1\) of 2"):
        storage.load(storage.path_for(tmp_path, key, other), procs[0].layout, 0, 11, other)
    # A one-process engine's file, read by a process of two.
    storage.save(storage.path_for(tmp_path, "k1"), EnginePages(engine).read_tokens(src, 0, 4))
    with pytest.raises(ValueError, match=r"written by an engine of another layout \(one "
                                         r"process \(every KV head\)\); this reader is process 1"):
        storage.load(storage.path_for(tmp_path, "k1", procs[1].share), procs[1].layout, 0, 4,
                     procs[1].share)
    assert not storage.is_stored(tmp_path, "k1", 2, other_layouts=False)  # the producer saves


def test_each_process_offloads_its_heads_to_its_own_tier_and_restores_them():
    engine, host, _ = _engine(np.random.default_rng(5), 4)
    procs = _processes(engine, 4)
    stored, loaded_into = [5, 1, 3], [2, 4, 0]
    tiers = [HostPageStore(p.layout, BLOCK, num_chunks=2, blocks_per_chunk=2) for p in procs]
    assert tiers[0].page_bytes * 2 == HostPageStore(EnginePages(engine).layout, BLOCK, 2,
                                                    2).page_bytes
    pending = [t.store_async(p, stored, [3, 0, 1]) for t, p in zip(tiers, procs)]
    zeros = [[tuple(np.zeros((len(stored) * BLOCK, 2, HEAD_SIZE), a.dtype) for a in s)
              for s in host] for _ in procs]
    for p, z in zip(procs, zeros):  # the next step's writes donate the cache meanwhile
        p.write_tokens(stored, 0, len(stored) * BLOCK, z)
    rows = token_slots([3, 0, 1], BLOCK, 0, len(stored) * BLOCK)
    slots = token_slots(stored, BLOCK, 0, len(stored) * BLOCK)
    for half, (t, job) in enumerate(zip(tiers, pending)):
        assert job.finish() == len(stored) * t.page_bytes
        heads = slice(2 * half, 2 * half + 2)
        for h, r in zip([a for s in host for a in s], [a for s in t.rows for a in s]):
            _equal(r[rows], h[slots][:, heads])
    for t, p in zip(tiers, procs):
        t.load(p, [3, 0, 1], loaded_into)
    into = token_slots(loaded_into, BLOCK, 0, len(stored) * BLOCK)
    for h, d in zip([a for s in host for a in s], [a for s in _device(engine) for a in s]):
        _equal(d[into], h[slots])
