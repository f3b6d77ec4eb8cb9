"""Pipeline parallel inside the one SPMD program: the mesh gains a "stage" axis of N slices,
a decoder's L layers are split into N contiguous stages of L/N layers, and each stage's
weights and KV cache arrays live only on its slice of the mesh (combined with tensor
parallel: a (stage, data, model) mesh, every stage split over its own model-axis devices).

How the arrays are laid out: layer j of every stage is stacked into one array per leaf,
[N, ...], whose leading axis the stage axis splits (StagedLayers), so stage s's devices
hold exactly layers s*L/N .. (s+1)*L/N - 1. The KV cache arrays of local layer j are
[N * slots, K, H], the stage axis splitting the slots: stage s holds its layer's pages as a
[slots, K, H] array, no stacked axis to squeeze (a squeezed size-1 axis let XLA pick
another layout for the cache inside the stage's branch and copy the whole cache into and
out of it every step when TP leaves one KV head per device).

How a step runs (run_microbatched): the engine splits the step's requests into M
micro-batches (one per stage today), each padded to one bucket and stacked [M, ...]. A
shard_map manual over the stage axis only (GSPMD still splits the model axis inside, as
data parallel does, runner/engine._forward_replicas) runs GPipe's schedule: in tick t
stage s runs its layers on micro-batch t - s (lax.cond on the traced stage index: a stage
with nothing to do, filling or draining, or a micro-batch without requests, skips its
layers and writes nothing into its cache), then every stage hands its activations to the
next (one ppermute); after M + N - 1 ticks one psum shares the last stage's outputs with
every stage for the LM head. With M = N each stage is busy M of the 2N - 1 ticks (the
bubble: N - 1 ticks of 2N - 1 idle; stages running strictly in turn would idle N - 1 of
N), at the price of padding each micro-batch to the bucket of the largest.

Across JAX processes (multi-host, distributed/multihost.py) the stage axis spans the processes:
the mesh takes the same number of devices from each (stage_devices), so each process holds
whole stages, and places only its own stages' layers (StageStack); what crosses the hosts
per step is the ppermuted activations and the final psum, not a collective per layer.

The stage index is traced, so layer j of every stage must agree in the tree and shapes of
its weights and cache and in its static arguments (e.g. sliding windows); the engine
refuses, by name, models whose layers differ."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xla_inference.kernels.metadata import KvCache

STAGE_AXIS = "stage"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StagedLayers:
    """A decoder's layers split into pipeline stages: local[j] is the j-th layer of every
    stage, each leaf stacked [num_stages, ...] on the stage axis."""

    local: list


def num_stages(mesh) -> int:
    """The stage axis' size of a mesh (concrete or abstract); 1 when it has none."""
    return dict(mesh.shape).get(STAGE_AXIS, 1)


def stage_devices(devices: Sequence, needed: int) -> list:
    """The `needed` devices a pipeline mesh takes, stage slices consecutive: the first
    `needed`, or, when the devices belong to several JAX processes (multi-host,
    distributed/multihost.py), needed / P of each process's, in process order, so the stage axis
    spans the processes (each holds whole stages, their layers and KV pages, and only the
    activations between stages cross hosts) and no process is left out of the mesh (it runs
    the same program and reads the step's outputs from its own devices)."""
    return devices_from_each_process(devices, needed, "pipeline parallel")


def devices_from_each_process(devices: Sequence, needed: int, what: str) -> list:
    """The first `needed` devices in one JAX process; across several, needed / P of each
    process's, in process order. Every process runs the same step (the multi-host follower
    makes each call the driver makes) and reads its outputs from its own devices, so each
    must hold the same share of the mesh: a process left out of it could not run the step.
    `what`: the mesh, named in the refusal when `needed` does not split so."""
    by_process: dict[int, list] = {}
    for device in devices:
        by_process.setdefault(device.process_index, []).append(device)
    if len(by_process) == 1:
        return list(devices)[:needed]
    per_process, rest = divmod(needed, len(by_process))
    counts = {p: len(local) for p, local in sorted(by_process.items())}
    if rest or per_process == 0 or min(counts.values()) < per_process:
        raise ValueError(f"{what} across {len(counts)} JAX processes takes the same "
                         f"number of devices from each: the mesh's {needed} devices do not "
                         f"split so over processes with {counts} devices")
    return [d for p in sorted(by_process) for d in by_process[p][:per_process]]


def check_stackable(layers: list, stages: int) -> None:
    """Raise unless the layers split evenly into `stages` and layer j of every stage has the
    same tree and shapes (a dense decoder's do; a model mixing dense and MoE layers may not)."""
    if len(layers) % stages != 0:
        raise ValueError(f"pipeline_parallel_size={stages} must divide the model's "
                         f"{len(layers)} layers")
    per_stage = len(layers) // stages
    for j in range(per_stage):
        group = layers[j::per_stage]
        shapes = [jax.tree.map(np.shape, layer) for layer in group]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ValueError(f"pipeline parallel needs layer {j} of every stage to have the "
                             "same weights' shapes; this model's layers differ between stages")


class StageStack:
    """One leaf of layer j of every stage, as the host array [N, ...] they stack into, stacked
    only where read: placement (parallel/sharding.place) asks for each of this process's
    devices' slices, so a process copies only its own stages' layers (across hosts, one
    stage's of N), not the whole stack, and no stacked copy of every layer outlives it."""

    def __init__(self, parts):
        # A checkpoint tensor not read yet stays so: only this process's stages are read.
        self.parts = [p if reads_by_slice(p) else np.asarray(p) for p in parts]
        self.shape = (len(self.parts), *self.parts[0].shape)
        self.dtype = self.parts[0].dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        stages, rest = index[0], index[1:]
        if isinstance(stages, (int, np.integer)):
            return self.parts[stages][rest]
        return np.stack([self.parts[s][rest] for s in range(len(self.parts))[stages]])

    def __array__(self, dtype=None, copy=None):
        stacked = np.stack(self.parts)
        return stacked if dtype is None else stacked.astype(dtype)


def reads_by_slice(array) -> bool:
    """A host array read only where indexed (loading/safetensors.CheckpointSlices, named
    by its marker: parallel/ sits below loading/); np.asarray would read it whole."""
    return getattr(array, "read_by_slice", False) is True


def stage_params(params, shardings, mesh: Mesh):
    """(params, their shardings) of a model whose `layers` field is a list of layers ->
    the same with `layers` as StagedLayers (each leaf a StageStack of every stage's, each
    sharding with the stage axis in front of its own spec)."""
    stages = num_stages(mesh)
    check_stackable(params.layers, stages)
    per_stage = len(params.layers) // stages
    local = [jax.tree.map(lambda *a: StageStack(a), *params.layers[j::per_stage])
             for j in range(per_stage)]

    def staged(sharding):
        return NamedSharding(mesh, PartitionSpec(STAGE_AXIS, *sharding.spec))

    local_shardings = [jax.tree.map(staged, s) for s in shardings.layers[:per_stage]]
    return (dataclasses.replace(params, layers=StagedLayers(local)),
            dataclasses.replace(shardings, layers=StagedLayers(local_shardings)))


def stage_kv_sharding(sharding: NamedSharding) -> NamedSharding:
    """A one-stage cache array's sharding ([slots, K, H], slots not split) -> that of the
    stages' arrays side by side, [N * slots, K, H], each stage's slots on its devices."""
    spec = tuple(sharding.spec) + (None,) * (3 - len(sharding.spec))
    if spec[0] is not None:
        raise ValueError(f"a KV cache sharding that splits the slots: {sharding.spec}")
    return NamedSharding(sharding.mesh, PartitionSpec(STAGE_AXIS, *spec[1:]))


def layer_stage(layer: int, num_layers: int, stages: int) -> tuple[int, int]:
    """(stage, index within it) of a layer."""
    return divmod(layer, num_layers // stages)


def run_microbatched(layer_step: Callable, layers: StagedLayers, kv_cache: KvCache,
                     xs: jax.Array, batches, *per_layer: Sequence) -> tuple[KvCache, jax.Array]:
    """The stages overlapped over M micro-batches (GPipe's schedule, inside one step): xs
    [M, T, D] and `batches` (a pytree of [M, ...] arrays) are the step's requests in M
    groups; in tick t stage s runs its layers on micro-batch t - s, then every stage hands
    its activations to the next (one ppermute), so after N - 1 ticks of filling all
    stages work at once; M + N - 1 ticks in all. layer_step(layer, x, layer cache, batch,
    *that layer's per_layer entries). The stage index is traced here, so every stage's
    layer j must take the same static arguments. -> (cache, hidden [M, T, D])."""
    mesh = jax.sharding.get_abstract_mesh()
    stages, per_stage = num_stages(mesh), len(layers.local)
    args = [tuple(seq[:per_stage]) for seq in per_layer]
    for seq, first in zip(per_layer, args):
        if any(tuple(seq[s * per_stage:(s + 1) * per_stage]) != first for s in range(stages)):
            raise ValueError("pipeline micro-batches need every stage's layers to take the "
                             "same static arguments (e.g. sliding windows)")

    def body(local, arrays, xs, batches):
        return _microbatch_body(layer_step, local, arrays, xs, batches, kv_cache, stages, args)

    # `batches` goes in as an argument, not a closure: inside a replica's map over the data
    # axis (PP x DP: runner/engine._forward_replicas) a closed-over array would carry
    # that outer map's mesh axes, not this one's.
    stage, whole = PartitionSpec(STAGE_AXIS), PartitionSpec()
    arrays, xs = jax.shard_map(
        body, mesh=mesh, in_specs=(stage, stage, whole, whole), out_specs=(stage, whole),
        axis_names={STAGE_AXIS}, check_vma=False)(layers.local, kv_cache.arrays, xs, batches)
    return dataclasses.replace(kv_cache, arrays=arrays), xs


def _microbatch_body(layer_step, local, arrays, xs, batches, kv_cache: KvCache, stages: int,
                     args: list[tuple]):
    me = jax.lax.axis_index(STAGE_AXIS)
    layers = [jax.tree.map(lambda a: a[0], layer) for layer in local]
    M = xs.shape[0]
    # A micro-batch without requests (fewer requests than micro-batches) is all padding:
    # no real page in its block tables. Its ticks are skipped like the filling ones.
    live = jnp.any(batches.attention.block_tables.reshape(M, -1) != 0, axis=1)
    out = jnp.zeros_like(xs)
    received = jnp.zeros_like(xs[0])
    for t in range(M + stages - 1):
        m = t - me
        index = jnp.clip(m, 0, M - 1)
        works = (m >= 0) & (m < M) & live[index]
        x = jnp.where(me == 0, xs[min(t, M - 1)], received)
        batch = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False),
                             batches)

        def run(arrays, x, batch=batch, index=index):
            cache = dataclasses.replace(kv_cache, arrays=arrays)
            for j, layer in enumerate(layers):
                kv, x = layer_step(_for_microbatch(layer, index), x, cache.layer(j), batch,
                                   *(a[j] for a in args))
                cache = cache.updated(j, kv)
            return list(cache.arrays), x

        arrays, y = jax.lax.cond(works, run, lambda arrays, x: (list(arrays), x), arrays, x)
        done = works & (me == stages - 1)
        out = jnp.where(done, jax.lax.dynamic_update_index_in_dim(out, y, index, 0), out)
        received = jax.lax.ppermute(y, STAGE_AXIS, [(s, s + 1) for s in range(stages - 1)])
    out = jax.lax.psum(jnp.where(me == stages - 1, out, jnp.zeros_like(out)), STAGE_AXIS)
    return arrays, out


def _for_microbatch(layer, index: jax.Array):
    """A layer as micro-batch `index` sees it: weights that carry per-token state of every
    micro-batch (a LoRA weight's column mask by token, [M, T, ...]: lora/slots.py, named by
    its for_microbatch method: parallel/ sits below lora/) take that micro-batch's."""
    def has_view(node):
        return hasattr(node, "for_microbatch")

    return jax.tree.map(lambda n: n.for_microbatch(index) if has_view(n) else n, layer,
                        is_leaf=has_view)
