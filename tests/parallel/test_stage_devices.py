"""Which devices a mesh takes (parallel/pipeline.stage_devices for pipeline stages,
parallel/sharding.mesh_grid for (data, model) meshes): in one process the first ones; across
JAX processes (multi-host) the same number from each, in process order, so none is left out
of the mesh (every process runs the step). And the stages' layers placed from a StageStack
(stacked only where a device's slice is read) equal the stacked arrays, each stage's on its
own devices."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from xla_inference.parallel.pipeline import StageStack, stage_devices
from xla_inference.parallel.sharding import build_mesh, mesh_grid, place


def _devices(*per_process: int) -> list:
    return [SimpleNamespace(process_index=p, id=1000 * p + i)
            for p, n in enumerate(per_process) for i in range(n)]


def _where(devices) -> list[tuple[int, int]]:
    return [(d.process_index, d.id % 1000) for d in devices]


def test_one_process_takes_the_first_devices():
    assert _where(stage_devices(_devices(8), 4)) == [(0, 0), (0, 1), (0, 2), (0, 3)]


@pytest.mark.parametrize("stages, tp, expected_stages", [
    # PP 2 x TP 2 over two hosts of 4: stage 0 on host 0's first two, stage 1 on host 1's.
    (2, 2, [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]),
    # PP 2 alone: one device of each host.
    (2, 1, [[(0, 0)], [(1, 0)]]),
    # PP 2 x TP 4: every device, one host per stage.
    (2, 4, [[(0, i) for i in range(4)], [(1, i) for i in range(4)]]),
    # PP 4 x TP 2: two whole stages per host.
    (4, 2, [[(0, 0), (0, 1)], [(0, 2), (0, 3)], [(1, 0), (1, 1)], [(1, 2), (1, 3)]]),
])
def test_across_two_processes_each_stage_stays_on_one(stages, tp, expected_stages):
    # Interleaved as a device list may come; the choice goes by process, then order.
    devices = sorted(_devices(4, 4), key=lambda d: d.id % 1000)
    chosen = _where(stage_devices(devices, stages * tp))
    assert [chosen[s * tp:(s + 1) * tp] for s in range(stages)] == expected_stages


@pytest.mark.parametrize("per_process, needed", [((4, 4), 3), ((4, 2), 8), ((4, 4, 4), 2)])
def test_a_mesh_that_does_not_split_evenly_over_the_processes_is_refused(per_process, needed):
    with pytest.raises(ValueError, match="takes the same number of devices from each"):
        stage_devices(_devices(*per_process), needed)


def test_one_process_mesh_takes_the_first_devices():
    grid = mesh_grid(2, 2, _devices(8))
    assert grid.shape == (2, 2)
    assert [_where(row) for row in grid] == [[(0, 0), (0, 1)], [(0, 2), (0, 3)]]


@pytest.mark.parametrize("tp, dp, expected_rows", [
    # TP 4 over two hosts of 4: two of each (the first four would leave host 1 out).
    (4, 1, [[(0, 0), (0, 1), (1, 0), (1, 1)]]),
    # DP 2 x TP 2: one replica per host.
    (2, 2, [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]),
    # DP 2 alone: one device of each host.
    (1, 2, [[(0, 0)], [(1, 0)]]),
    # TP 8: every device, as before.
    (8, 1, [[(p, i) for p in range(2) for i in range(4)]]),
    # DP 2 x TP 4: every device, a replica per host.
    (4, 2, [[(0, i) for i in range(4)], [(1, i) for i in range(4)]]),
])
def test_across_two_processes_the_mesh_takes_the_same_from_each(tp, dp, expected_rows):
    devices = sorted(_devices(4, 4), key=lambda d: d.id % 1000)  # interleaved
    grid = mesh_grid(tp, dp, devices)
    assert grid.shape == (dp, tp)
    assert [_where(row) for row in grid] == expected_rows


@pytest.mark.parametrize("per_process, tp, dp", [((4, 4), 3, 1), ((4, 4, 4), 4, 1),
                                                 ((6, 2), 4, 2), ((4, 4), 1, 1)])
def test_a_mesh_that_leaves_a_process_out_is_refused(per_process, tp, dp):
    counts = {p: n for p, n in enumerate(per_process)}
    with pytest.raises(ValueError, match=rf"tensor_parallel_size={tp} x data_parallel_size={dp} "
                                         rf"across {len(per_process)} JAX processes takes the same "
                                         rf"number of devices from each: the mesh's {tp * dp} "
                                         rf"devices do not split so over processes with "
                                         rf"{re.escape(str(counts))} devices"):
        mesh_grid(tp, dp, _devices(*per_process))


def test_a_stage_stack_reads_as_the_stacked_array():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((6, 4)).astype(np.float32) for _ in range(3)]
    stack, stacked = StageStack(parts), np.stack(parts)
    assert stack.shape == stacked.shape and stack.dtype == stacked.dtype and stack.ndim == 3
    for index in [(slice(1, 2), slice(None), slice(2, 4)), (slice(0, 3), slice(3, 6)),
                  (2,), (slice(None),)]:
        np.testing.assert_array_equal(stack[index], stacked[index])
    np.testing.assert_array_equal(np.asarray(stack), stacked)


def test_placed_stage_stack_puts_each_stage_on_its_devices():
    """PP 2 x TP 2: stage s's devices hold part s, split over the model axis as its spec says."""
    mesh = build_mesh(2, pipeline_parallel_size=2)
    parts = [np.arange(32, dtype=np.float32).reshape(8, 4) + 100 * s for s in range(2)]
    placed = place(StageStack(parts), NamedSharding(mesh, PartitionSpec("stage", "model")))
    np.testing.assert_array_equal(np.asarray(placed), np.stack(parts))
    for stage, devices in enumerate(mesh.devices.reshape(2, -1)):
        for tp_rank, device in enumerate(devices):
            shard = next(s for s in placed.addressable_shards if s.device == device)
            np.testing.assert_array_equal(np.asarray(shard.data)[0],
                                          parts[stage][4 * tp_rank:4 * (tp_rank + 1)])
