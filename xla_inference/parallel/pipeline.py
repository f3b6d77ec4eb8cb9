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

How a step runs (run_staged): a shard_map manual over the stage axis only (GSPMD still
splits the model axis inside, as data parallel does, runner/engine._forward_replicas). In
round r stage r runs its layers (lax.cond on the stage index: the other stages skip them,
and write nothing into their caches) and hands its activations to stage r + 1
(ppermute); after the last round the last stage's output is shared with every stage (one
psum) for the LM head. So the stages run one after another: while one runs, the others
idle (the pipeline bubble; with N stages each device is busy 1/N of the forward).
Micro-batches that would fill the bubble are not implemented.

Each round's branch is traced with that round's layers' static arguments (e.g. sliding
windows), so stages may differ in those; what must agree between stages is the tree and
shape of layer j's weights and cache (the engine checks and refuses otherwise)."""

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


def stage_params(params, shardings, mesh: Mesh):
    """(params, their shardings) of a model whose `layers` field is a list of layers ->
    the same with `layers` as StagedLayers (host arrays stacked per stage, each sharding
    with the stage axis in front of its own spec)."""
    stages = num_stages(mesh)
    check_stackable(params.layers, stages)
    per_stage = len(params.layers) // stages
    local = [jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]),
                          *params.layers[j::per_stage]) for j in range(per_stage)]

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


def run_staged(layer_step: Callable, layers: StagedLayers, kv_cache: KvCache, x: jax.Array,
               *per_layer: Sequence) -> tuple[KvCache, jax.Array]:
    """models/decoder.run_layers over pipeline stages (module docstring): the stages in
    turn, each on its own devices; kv_cache holds one set of arrays per local layer, each
    [N * slots, K, H] split over the stages. per_layer: sequences over all L layers (static values)."""
    mesh = jax.sharding.get_abstract_mesh()
    stages, per_stage = num_stages(mesh), len(layers.local)
    # The step's other inputs that layer_step closes over (the batch, rope tables) enter
    # the shard_map as closed-over values, replicated over the stages.
    def body(local, arrays, x):
        return _stages_body(layer_step, local, arrays, x, kv_cache, stages, per_stage, per_layer)

    stage, whole = PartitionSpec(STAGE_AXIS), PartitionSpec()
    arrays, x = jax.shard_map(
        body, mesh=mesh, in_specs=(stage, stage, whole), out_specs=(stage, whole),
        axis_names={STAGE_AXIS}, check_vma=False)(layers.local, kv_cache.arrays, x)
    return dataclasses.replace(kv_cache, arrays=arrays), x


def _stages_body(layer_step, local, arrays, x, kv_cache: KvCache, stages: int, per_stage: int,
                 per_layer: Sequence):
    """One stage's view (inside the shard_map): its layers ([1, ...] leaves) and its cache
    arrays ([slots, K, H])."""
    me = jax.lax.axis_index(STAGE_AXIS)
    layers = [jax.tree.map(lambda a: a[0], layer) for layer in local]
    for r in range(stages):
        args = [seq[r * per_stage:(r + 1) * per_stage] for seq in per_layer]

        def run(arrays, x, args=args):
            cache = dataclasses.replace(kv_cache, arrays=arrays)
            for j, layer in enumerate(layers):
                kv, x = layer_step(layer, x, cache.layer(j), *(a[j] for a in args))
                cache = cache.updated(j, kv)
            return list(cache.arrays), x

        arrays, y = jax.lax.cond(me == r, run, lambda arrays, x: (list(arrays), x), arrays, x)
        if r + 1 < stages:  # stage r's activations to stage r + 1 only
            x = jax.lax.ppermute(y, STAGE_AXIS, [(r, r + 1)])
    x = jax.lax.psum(jnp.where(me == stages - 1, y, jnp.zeros_like(y)), STAGE_AXIS)
    return arrays, x
