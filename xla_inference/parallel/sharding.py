"""One SPMD program over a mesh of the local devices: the mesh, and where every array lives.

Model code never names mesh axes. Parameters declare their logical axes where their
dataclass declares them (parallel/axes.py), and `LOGICAL_RULES` maps each logical axis to
a mesh axis; a parameter that declares none is replicated. XLA's SPMD partitioner
(GSPMD) inserts the collectives, except where a layer partitions by hand what GSPMD cannot
or should not (shard_map): attention split by KV heads (a custom call has no partitioning
rule) and the collective matmuls (parallel/collective_matmul.py). Those layers reach the
mesh through JAX's context mesh, set while the engine traces its step (traced_over).

A logical axis is split only when its size (heads, kv heads, mlp width, experts, vocab)
divides evenly by the mesh axis: otherwise it is replicated, so every tensor-parallel size
up to the device count works. SmolLM2's 3 KV heads under TP 2 are replicated, as are its 9
query heads; its MLP and vocabulary are still split.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xla_inference.parallel.axes import field_axes
from xla_inference.parallel.pipeline import (StageStack, devices_from_each_process,
                                             reads_by_slice, stage_devices)

MESH_AXES = ("data", "model")
TENSOR_AXIS = "model"  # the mesh axis tensor parallel splits over
DATA_AXIS = "data"  # the mesh axis data parallel replicas split over
# MoE under data parallel (vLLM's "DP attention + EP"): the routed experts split over every
# device of the (data, model) mesh, data-major (device (d, m) holds share d * model + m).
REPLICAS_AND_TENSOR = (DATA_AXIS, TENSOR_AXIS)

# logical axis -> mesh axis (None: replicated)
LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "experts": "model",  # expert parallel: each model-axis device holds E / tp experts
    "embed": None,
    "head_dim": None,
    "slots": None,
}

KV_CACHE_AXES = ("slots", "kv_heads", "head_dim")  # each layer's K and V [num_slots, K, H]
# With data parallel replicas each replica has its own cache: [replicas, num_slots, K, H].
REPLICA_AXIS = "batch"


def build_mesh(tensor_parallel_size: int = 1, data_parallel_size: int = 1,
               devices: list | None = None, pipeline_parallel_size: int = 1) -> Mesh:
    """A (data, model) mesh; with pipeline stages a (stage, data, model) mesh whose stage
    slices take consecutive devices (parallel/pipeline.py)."""
    grid = mesh_grid(tensor_parallel_size, data_parallel_size,
                     list(jax.devices() if devices is None else devices), pipeline_parallel_size)
    return Mesh(grid, ("stage", *MESH_AXES) if pipeline_parallel_size > 1 else MESH_AXES)


def mesh_grid(tensor_parallel_size: int, data_parallel_size: int, devices: list,
              pipeline_parallel_size: int = 1) -> np.ndarray:
    """The mesh's devices [data, model] (or [stage, data, model]): the first ones, or
    across several JAX processes (multi-host) the same number from each, in process order
    (parallel/pipeline.devices_from_each_process): with fewer mesh devices than devices,
    the first ones alone could leave a process out of the mesh (TP 4 over two hosts of 4:
    the follower), and every process runs the step."""
    needed = tensor_parallel_size * data_parallel_size * pipeline_parallel_size
    if needed > len(devices):
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} x data_parallel_size={data_parallel_size} "
            f"x pipeline_parallel_size={pipeline_parallel_size} needs {needed} devices, but JAX "
            f"sees {len(devices)} ({devices[0].platform}); on CPU, "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N makes N virtual devices")
    if pipeline_parallel_size > 1:
        return np.array(stage_devices(devices, needed)).reshape(
            pipeline_parallel_size, data_parallel_size, tensor_parallel_size)
    chosen = devices_from_each_process(
        devices, needed, f"a mesh of tensor_parallel_size={tensor_parallel_size} x "
                         f"data_parallel_size={data_parallel_size}")
    return np.array(chosen).reshape(data_parallel_size, tensor_parallel_size)


def logical_sizes(cfg) -> dict[str, int]:
    """How many units each logical axis has for a model config (split only whole units)."""
    moe = getattr(cfg, "moe", None)
    return {
        "heads": getattr(cfg, "num_heads", 0),
        "kv_heads": getattr(cfg, "num_kv_heads", 0),
        "mlp": getattr(cfg, "intermediate_size", 0),
        "vocab": getattr(cfg, "vocab_size", 0),
        "experts": getattr(moe, "num_experts", 0) if moe is not None else 0,
    }


def partition_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], sizes: dict[str, int],
                   mesh: Mesh) -> PartitionSpec:
    """The mesh axis of every array axis, replicating where the split would not be even
    (in whole units of the logical axis, e.g. heads, and in array elements). A mesh axis
    serves the first array axis that can use it: experts before the MLP width."""
    spec = []
    for axis, dim in zip(axes, shape):
        mesh_axis = LOGICAL_RULES.get(axis) if axis else None
        if mesh_axis is not None:
            n = mesh.shape[mesh_axis]
            units = sizes.get(axis, 0)
            if units <= 0 or units % n != 0 or dim % n != 0 or mesh_axis in spec:
                mesh_axis = None
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def param_shardings(params, cfg, mesh: Mesh, experts_across_replicas: str | None = None):
    """A NamedSharding for every parameter leaf (the same tree), from the logical axes each
    parameter dataclass declares (parallel/axes.py) and LOGICAL_RULES.

    experts_across_replicas ("experts" or "mlp", with data parallel replicas): the routed
    experts split over the data and model axes together (expert_spec); quantized ones by
    expert only (LoRA stacks beside them follow their expert axis, lora/slots.LoraSlots
    .place)."""
    sizes = logical_sizes(cfg)

    def leaf_sharding(leaf, axes, dense=True):
        if leaf is None:
            return None
        if axes is None or len(axes) != np.ndim(leaf):
            axes = (None,) * np.ndim(leaf)  # declared none (or a whole subtree): replicated
        spec = None
        if experts_across_replicas is not None and "experts" in axes:
            # A quantized stack's arrays (values, scales, offsets) split only by expert:
            # its width cut alone would not be a layout the products take whole.
            spec = expert_spec(axes, np.shape(leaf), mesh,
                               experts_across_replicas if dense else "experts",
                               fallback=dense)
        if spec is None:
            spec = partition_spec(axes, np.shape(leaf), sizes, mesh)
        return NamedSharding(mesh, spec)

    def walk(node, axes=None):
        if is_packed_weight(node):
            return dataclasses.replace(node, **{
                name: leaf_sharding(getattr(node, name), packed_axes(node, name, axes), False)
                for name in ("values", "scales", "offsets")})
        if dataclasses.is_dataclass(node):
            return dataclasses.replace(node, **{
                f.name: walk(getattr(node, f.name), field_axes(f))
                for f in dataclasses.fields(node) if f.init})
        if isinstance(node, (list, tuple)):
            return type(node)(walk(child) for child in node)
        if isinstance(node, dict):  # a subtree without declared axes (a vision tower): replicated
            return {key: walk(child) for key, child in node.items()}
        return leaf_sharding(node, axes)

    return walk(params)


def expert_spec(axes: tuple, shape: tuple[int, ...], mesh: Mesh, prefer: str,
                fallback: bool = True) -> PartitionSpec | None:
    """An expert stack's spec over the data and model axes together (MoE under data
    parallel, as vLLM splits it over its DP x TP ranks): by expert ("experts", vLLM's
    --enable-expert-parallel) or by the intermediate width ("mlp", vLLM's default: tensor
    parallel of every expert over all ranks), the other (`fallback`) where the preferred
    does not divide; None where none does (then each replica holds the model axis' split
    alone, and runs its own tokens through it). Quantized experts (packed: values, scales
    and offsets each) split by expert only, whatever the preference (no fallback)."""
    devices = mesh.shape[DATA_AXIS] * mesh.shape[TENSOR_AXIS]
    if mesh.shape[DATA_AXIS] == 1 or "stage" in mesh.axis_names:
        return None
    other = "mlp" if prefer == "experts" else "experts"
    for logical in (prefer, other) if fallback else (prefer,):
        if logical in axes and shape[axes.index(logical)] % devices == 0:
            spec = [None] * len(axes)
            spec[axes.index(logical)] = REPLICAS_AND_TENSOR
            return PartitionSpec(*spec)
    return None


def replica_local_specs(shardings):
    """The in_specs of the data parallel replicas' shard_map (manual over the data axis
    only) for arrays placed as `shardings`: each array's data-axis cut, nothing else (the
    model axis stays GSPMD's inside). Only expert stacks split across replicas have one."""
    def data_part(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        return DATA_AXIS if DATA_AXIS in names else None

    def spec(sharding):
        return PartitionSpec(*(data_part(entry) for entry in sharding.spec))

    return jax.tree.map(spec, shardings, is_leaf=lambda n: isinstance(n, NamedSharding))


def is_packed_weight(node) -> bool:
    """A quantized weight (quantization/packed.PackedWeight; named by duck type, since
    parallel/ sits below quantization/): its arrays follow the weight's logical axes."""
    return dataclasses.is_dataclass(node) and hasattr(node, "tiled") and hasattr(node, "values")


def packed_axes(node, name: str, axes: tuple | None) -> tuple | None:
    """A packed weight's array `name` split as its [out, in] weight declares (`axes`): the
    tile layout's first two axes are row tiles and input chunks or groups (the third, the
    16 rows of a tile or the bytes of a chunk, is never split); the plain FP8 layout is
    [out, in] and [out, groups]; the Pallas quantized matmul's K-major layout (k_major) is
    [in (4 bits: in / 2), out] and [groups, out]."""
    if axes is None:
        return None
    if hasattr(node, "array_axes"):  # stacked MoE experts (quantization/experts.py): own order
        return node.array_axes(tuple(axes))
    if getattr(node, "k_major", False):
        return tuple(axes)[::-1]
    return tuple(axes) + (None,) if node.tiled else tuple(axes)


def mark_tensor_splits(params, shardings):
    """(params, shardings) with every packed weight in the Pallas quantized matmul's layout
    (k_major) told which axis of its values the tensor-parallel axis splits (its static
    `tensor_split`: 0 the inputs, 1 the outputs, None neither), the same in both trees. A
    Pallas kernel has no partitioning rule (GSPMD would gather its operands whole on every
    device); quantization/product.py partitions such a product by hand (shard_map) from
    this. The scales and offsets must split with the values (else None: GSPMD's way)."""
    def split_of(node) -> int | None:
        # The last two axes (pipeline stages stack layers in front: parallel/pipeline.py).
        specs = [tuple(getattr(node, name).spec)[-2:] for name in ("values", "scales",
                                                                     "offsets")
                 if getattr(node, name) is not None]
        for axis in (0, 1):
            if all(len(spec) == 2 and spec[axis] == TENSOR_AXIS for spec in specs):
                return axis
        return None

    def mark_sharding(node):
        if not (is_packed_weight(node) and getattr(node, "k_major", False)):
            return node
        return dataclasses.replace(node, tensor_split=split_of(node))

    shardings = jax.tree.map(mark_sharding, shardings, is_leaf=is_packed_weight)

    def mark_param(node, sharding):
        if not (is_packed_weight(node) and getattr(node, "k_major", False)):
            return node
        return dataclasses.replace(node, tensor_split=sharding.tensor_split)

    return jax.tree.map(mark_param, params, shardings, is_leaf=is_packed_weight), shardings


def kv_cache_sharding(cfg, shape: tuple[int, ...], mesh: Mesh, replicas: bool = False
                      ) -> NamedSharding:
    """A KV cache array's sharding; `replicas`: its first axis is the data parallel replica."""
    axes = ((REPLICA_AXIS,) if replicas else ()) + KV_CACHE_AXES
    sizes = {**logical_sizes(cfg), REPLICA_AXIS: mesh.shape["data"]}
    return NamedSharding(mesh, partition_spec(axes, shape, sizes, mesh))


def replica_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays whose first axis is the data parallel replica: one replica per data-axis slot."""
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def place(host_array, sharding: NamedSharding) -> jax.Array:
    """Put a host array on the mesh shard by shard: no device receives more than its slice.
    A StageStack (pipeline stages' layers) and a checkpoint tensor not read yet
    (loading/safetensors.CheckpointSlices) are read only for this process's devices'
    slices, each distinct slice once (devices holding the same one, replicas, share the
    read). An array already placed (the torch path places as it loads) moves only if its
    sharding differs."""
    if isinstance(host_array, jax.Array):
        return jax.device_put(host_array, sharding)
    if not (isinstance(host_array, StageStack) or reads_by_slice(host_array)):
        host_array = np.asarray(host_array)
    slices: dict[tuple, np.ndarray] = {}

    def read(index):
        key = _index_key(index)
        if key not in slices:
            slices[key] = host_array[index]
        return slices[key]

    return jax.make_array_from_callback(host_array.shape, sharding, read)


def _index_key(index) -> tuple:
    """A hashable form of a device's index (a tuple of slices: unhashable before 3.12)."""
    index = index if isinstance(index, tuple) else (index,)
    return tuple((i.start, i.stop, i.step) if isinstance(i, slice) else i for i in index)


def place_params(params, shardings):
    return jax.tree.map(place, params, shardings)


# ---------------------------------------------------------------------------------------
# The mesh as traced code sees it. GSPMD partitions what it has rules for; a custom call
# (the native CPU attention, a Pallas kernel) has none, and a collective matmul is a
# schedule GSPMD does not choose. Layers that partition such work themselves (shard_map)
# reach the mesh the step is traced over here, through JAX's context mesh.


def traced_over(mesh: Mesh, fn):
    """fn traced with `mesh` as JAX's context mesh (what tensor_parallel_mesh returns), so
    that layers can partition by hand what GSPMD cannot; the engine wraps its step in it."""

    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def tensor_parallel_mesh():
    """The context mesh when its model axis splits work (size > 1 and not already manual,
    i.e. not inside a shard_map over it); None otherwise: one device, or no mesh given."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(TENSOR_AXIS, 1) == 1 or TENSOR_AXIS in mesh.manual_axes:
        return None
    return mesh


def left_to_gspmd(*operands) -> bool:
    """Whether the traced code reading `operands` (arrays, or pytrees of them) is
    partitioned by GSPMD: some axis of size > 1 of its mesh not manual (outside a shard_map
    over it). Its mesh: JAX's context mesh where one is set (traced_over; inside a
    shard_map); else the mesh the operands were placed on, which their abstract values
    carry through a jax.jit (one over params placed on a mesh without traced_over: GSPMD
    partitions it all the same). An Auto mesh's trace shows that mesh, not the operands'
    specs: operands replicated on a mesh of several devices count too. Code without a
    partitioning rule GSPMD would gather for (a loop reading experts by a dynamic index:
    kernels/xla_gmm.py) runs only where this is False."""
    mesh = jax.sharding.get_abstract_mesh()
    meshes = [mesh] if not mesh.empty else [
        jax.typeof(a).sharding.mesh for a in jax.tree.leaves(operands)]
    return any(not m.empty and any(size > 1 and name not in m.manual_axes
                                   for name, size in m.shape.items()) for m in meshes)


def splits(mesh, logical_axis: str, units: int, dim: int) -> bool:
    """Whether the rules table splits an array axis of `dim` elements holding `units` units
    of `logical_axis` over the tensor-parallel axis of `mesh` (as param_shardings does)."""
    spec = partition_spec((logical_axis,), (dim,), {logical_axis: units}, mesh)
    return spec[0] == TENSOR_AXIS


def refuse_nested_interpret_callbacks(mesh, kernel: str) -> None:
    """Refuse, with what to do instead, a TPU Pallas kernel in interpret mode about to run
    in a shard_map nested in another (tensor parallel inside data parallel replicas or
    pipeline stages) while JAX lowers through Shardy, its default partitioner.

    Why: the TPU interpret mode brackets each kernel with an *ordered* io_callback (its
    ordering barrier), and JAX threads an ordered effect's !stablehlo.token through every
    enclosing sdy.manual_computation. XLA's Shardy export of a nested manual computation
    whose operands and results hold that token fails a CHECK (HloSharding::ValidateTuple
    asks a token for its dimensions) and aborts the process. One level of shard_map, an
    unordered callback, or the GSPMD partitioner lower fine; the compiled Mosaic kernel
    (a tpu_custom_call, no callback, no token) nests like any custom call. So this is a
    CPU-testing limit only: JAX_USE_SHARDY_PARTITIONER=false runs it."""
    if mesh.manual_axes and jax.config.jax_use_shardy_partitioner:
        raise RuntimeError(
            f"{kernel} in Pallas' TPU interpret mode cannot run in a shard_map nested in "
            f"the manual axes {sorted(mesh.manual_axes)} under the Shardy partitioner: XLA "
            f"aborts exporting the interpret mode's ordered-callback token through nested "
            f"manual computations. Set JAX_USE_SHARDY_PARTITIONER=false (the GSPMD "
            f"partitioner lowers it), or use the GPU kernels' interpret mode")
