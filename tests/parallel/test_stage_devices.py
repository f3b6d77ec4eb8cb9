"""Which devices a pipeline mesh takes (parallel/pipeline.stage_devices): in one process the
first ones; across JAX processes (multi-host) the same number from each, in process order,
so the stage axis spans the processes and none is left out of the mesh. And the stages'
layers placed from a StageStack (stacked only where a device's slice is read) equal the
stacked arrays, each stage's on its own devices."""

from types import SimpleNamespace

import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from xla_inference.parallel.pipeline import StageStack, stage_devices
from xla_inference.parallel.sharding import build_mesh, place


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
