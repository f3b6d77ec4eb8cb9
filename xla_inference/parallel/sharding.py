"""One SPMD program over a mesh of the local devices: the mesh, and where every array lives.

Model code never names mesh axes. Parameters carry logical axes (from the table
`PARAM_AXES`, keyed by the parameter's field name and rank), and `LOGICAL_RULES` maps each
logical axis to a mesh axis. XLA's SPMD partitioner (GSPMD) inserts the collectives.

A logical axis is split only when its size (heads, kv heads, mlp width, experts, vocab)
divides evenly by the mesh axis: otherwise it is replicated, so every tensor-parallel size
up to the device count works. SmolLM2's 3 KV heads under TP 2 are replicated, as are its 9
query heads; its MLP and vocabulary are still split.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

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

# (field name, rank) -> logical axes of the array; fields not listed are replicated
# (norm weights, output biases, routers).
PARAM_AXES: dict[tuple[str, int], tuple[str | None, ...]] = {
    ("embed", 2): ("vocab", "embed"),
    # Dense linear weights are [out, in], as in the checkpoint (layers/linear.py).
    ("lm_head", 2): ("vocab", "embed"),
    ("wq", 2): ("heads", "embed"),
    ("wk", 2): ("kv_heads", "embed"),
    ("wv", 2): ("kv_heads", "embed"),
    ("wo", 2): ("embed", "heads"),
    ("bq", 1): ("heads",),
    ("bk", 1): ("kv_heads",),
    ("bv", 1): ("kv_heads",),
    ("w_gate", 2): ("mlp", "embed"),
    ("w_up", 2): ("mlp", "embed"),
    ("w_down", 2): ("embed", "mlp"),
    # MLA (layers/mla.py): the per-head projections split by heads; the latent projections
    # (wq_a, wkv_a) and the latent cache stay whole on every device.
    ("wq_nope", 3): (None, "heads", None),
    ("wq_rope", 3): (None, "heads", None),
    ("w_uk", 3): ("heads", None, None),
    ("w_uv", 3): ("heads", None, None),
    ("wo", 3): ("heads", None, "embed"),
    ("w_gate", 3): ("experts", "embed", "mlp"),
    ("w_up", 3): ("experts", "embed", "mlp"),
    ("w_down", 3): ("experts", "mlp", "embed"),
}

KV_CACHE_AXES = ("slots", "kv_heads", "head_dim")  # each layer's K and V [num_slots, K, H]
# With data parallel replicas each replica has its own cache: [replicas, num_slots, K, H].
REPLICA_AXIS = "batch"


def build_mesh(tensor_parallel_size: int = 1, data_parallel_size: int = 1,
               devices: list | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    needed = tensor_parallel_size * data_parallel_size
    if needed > len(devices):
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} x data_parallel_size={data_parallel_size} "
            f"needs {needed} devices, but JAX sees {len(devices)} ({devices[0].platform}); on CPU, "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N makes N virtual devices")
    grid = np.array(devices[:needed]).reshape(data_parallel_size, tensor_parallel_size)
    return Mesh(grid, MESH_AXES)


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


def _field_name(path) -> str:
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.GetAttrKey):
            return entry.name
    return ""


def param_shardings(params, cfg, mesh: Mesh):
    """A NamedSharding for every parameter leaf, from PARAM_AXES and LOGICAL_RULES."""
    sizes = logical_sizes(cfg)

    def sharding(path, leaf):
        axes = PARAM_AXES.get((_field_name(path), np.ndim(leaf)), (None,) * np.ndim(leaf))
        return NamedSharding(mesh, partition_spec(axes, np.shape(leaf), sizes, mesh))

    return jax.tree_util.tree_map_with_path(sharding, params)


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
    """Put a host array on the mesh shard by shard: no device receives more than its slice."""
    host_array = np.asarray(host_array)
    return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


def place_params(params, shardings):
    return jax.tree.map(place, params, shardings)
