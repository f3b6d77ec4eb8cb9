"""LoRA adapters on the torch path: vLLM's PyTorch model classes fuse q/k/v into one
QKVParallelLinear and gate/up into one MergedColumnParallelLinear, while a PEFT adapter
names q_proj, k_proj, ... one by one. The stacks are lora/slots.py's, laid out per PEFT
module exactly as for the native decoders (one A stack per group of modules that read the
same input, one B per module), so slot writes, LRU and the engine's token slots are shared.

In the step, each targeted vLLM linear layer's weight is known by the traced array it is
handed (functional_call passes our params as they are); torch's linear, which torchax
routes to our projection (torch_models/lowering.py), adds each fused member's delta
(layers/linear.lora_delta) side by side, in the order the fused weight's rows hold them."""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp

from xla_inference.layers.linear import lora_delta
from xla_inference.lora.peft import SERVED_MODULES
from xla_inference.lora.slots import LoraWeight, column_mask, group_members, group_of
from xla_inference.models.interface import LoraSupport

# id(traced weight) -> its members' LoraWeights, in the fused weight's row order, while a
# LoRA step is traced (lowering._projection reads it).
_ACTIVE: dict[int, list[LoraWeight]] = {}


@dataclasses.dataclass(frozen=True)
class FusedLayer:
    """A vLLM linear layer the adapters reach: its weight's place in the params, and the
    PEFT modules its output rows hold, in order, with their [out, in]."""

    param_index: int
    members: tuple[tuple[str, tuple[int, int]], ...]


def fused_layers(cfg) -> list[FusedLayer]:
    """The model's linear layers whose every member is a projection an adapter may target
    (q/k/v/o, gate/up/down: lora/peft.SERVED_MODULES), by the model class's
    packed_modules_mapping (qkv_proj -> q_proj, k_proj, v_proj)."""
    from vllm.model_executor.layers.linear import LinearBase

    packed = getattr(cfg.module, "packed_modules_mapping", {}) or {}
    index = {name: i for i, name in enumerate(cfg.param_names)}
    layers = []
    for name, layer in cfg.module.named_modules():
        if not isinstance(layer, LinearBase) or f"{name}.weight" not in index:
            continue
        prefix, _, leaf = name.rpartition(".")
        members = packed.get(leaf, [leaf])
        sizes = list(getattr(layer, "output_sizes", None) or [layer.output_size])
        if any(m not in SERVED_MODULES for m in members) or len(sizes) != len(members):
            continue
        paths = [f"{prefix}.{m}" if prefix else m for m in members]
        layers.append(FusedLayer(index[f"{name}.weight"],
                                 tuple((p, (out, layer.input_size)) for p, out in zip(paths, sizes))))
    return layers


def targets(params, cfg):
    """({PEFT module path: (out, in)}, the projection weights' dtype)."""
    layers = fused_layers(cfg)
    if not layers:
        raise ValueError(f"LoRA adapters: {cfg.architecture} has no q/k/v/o or gate/up/down "
                         "linear layers an adapter could target")
    for layer in layers:
        rows = sum(out for _, (out, _) in layer.members)
        if params[layer.param_index].value.shape[0] != rows:
            raise ValueError(f"LoRA adapters: {cfg.param_names[layer.param_index]} has "
                             f"{params[layer.param_index].value.shape[0]} rows, its members "
                             f"{[p for p, _ in layer.members]} {rows}")
    shapes = {path: shape for layer in layers for path, shape in layer.members}
    return shapes, params[layers[0].param_index].value.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TorchLoraParams:
    """The torch family's params with the step's adapters: for each targeted weight (by
    its index in params), its members' LoraWeights (base unused: the fused weight is)."""

    params: tuple
    members: dict  # str(param index) -> [LoraWeight], in row order


def attach(params, stacks: dict, token_slots: jax.Array, max_rank: int, cfg) -> TorchLoraParams:
    groups = group_members(stacks["b"])
    columns = next(iter(stacks["b"].values())).shape[1]
    mask = column_mask(token_slots, columns // max_rank, max_rank)
    members = {}
    for layer in fused_layers(cfg):
        weights = []
        for path, _ in layer.members:
            group = group_of(path)
            a = stacks["a"][group]
            weights.append(LoraWeight(None, a.reshape(-1, a.shape[-1]), stacks["b"][path],
                                      stacks["b_rows"][path], mask, groups[group].index(path)))
        members[str(layer.param_index)] = weights
    return TorchLoraParams(tuple(params), members)


@contextlib.contextmanager
def active(params):
    """Plain params while a step with adapters is traced (lowering._call); the adapters'
    members registered by the traced weight each belongs to."""
    if not isinstance(params, TorchLoraParams):
        yield params
        return
    for index, weights in params.members.items():
        _ACTIVE[id(params.params[int(index)].value)] = weights
    try:
        yield params.params
    finally:
        _ACTIVE.clear()


def add_delta(x: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
    """y = x w^T (+ b) with each token's adapter's delta, if w is a targeted weight."""
    weights = _ACTIVE.get(id(w))
    if not weights:
        return y
    deltas = [lora_delta(x, member, jnp.float32) for member in weights]
    return (y.astype(jnp.float32) + jnp.concatenate(deltas, axis=-1)).astype(y.dtype)


def stack_sharding(param_shardings, module: str):
    """The stacks stay whole on every device (any placement computes the same numbers
    under GSPMD; the fused weights' splits do not follow PEFT's per-module shapes)."""
    mesh = param_shardings[0].value.mesh
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


SUPPORT = LoraSupport(targets=targets, attach=attach, stack_sharding=stack_sharding)
