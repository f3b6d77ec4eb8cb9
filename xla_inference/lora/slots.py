"""Adapters on the device: per target module, A [S, r_max, in] and B [S, out, r_max] for S =
max_loras + 1 slots, slot 0 all zeros (the base model), each adapter zero-padded to r_max.

A step carries one slot index per token. Each targeted projection adds

    delta = (x A_slot^T) B_slot^T

computed for every slot at once as two dense products over the S * r_max columns: x times
all of A ([T, S*r]), masked to each token's own slot, times all of B. No gathers of [T, r,
in] weights, one program for every mix of adapters, and the cost is 2 T S r (in + out)
against the base product's T in out (S r = 80 against in = 4096: a few per cent).

Loading an adapter writes its slot with a donated in-place update (one program, compiled
at warm-up; the slot is a traced index), so adding, swapping and evicting adapters never
compiles. LoraSlots keeps which adapter is in which slot and evicts the least recently
used one that is not pinned and not in the step."""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.lora.peft import LoraAdapter, LoraError

# PEFT module suffix -> (block attribute of a decoder layer, weight attribute in it)
_DECODER_TARGETS = {"q_proj": ("attn", "wq"), "k_proj": ("attn", "wk"), "v_proj": ("attn", "wv"),
                    "o_proj": ("attn", "wo"), "gate_proj": ("mlp", "w_gate"),
                    "up_proj": ("mlp", "w_up"), "down_proj": ("mlp", "w_down")}
_BLOCK_PATH = {"attn": "self_attn", "mlp": "mlp"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraWeight:
    """A base projection weight [out, in] with the adapters' stacks and the step's per-token
    slots; layers/linear.project adds lora_delta for it."""

    base: jax.Array
    a: jax.Array  # [S, r, in]
    b: jax.Array  # [S, out, r]
    token_slots: jax.Array  # [T] int32, 0 = no adapter

    @property
    def shape(self):
        return self.base.shape

    @property
    def dtype(self):
        return self.base.dtype


def lora_delta(x: jax.Array, w: LoraWeight, out_dtype) -> jax.Array:
    """x [T, in] -> [T, out]: each token's adapter's (x A^T) B^T (zero for slot 0)."""
    S, r, _ = w.a.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).astype(w.a.dtype)
    xa = jnp.einsum("ti,ki->tk", x2, w.a.reshape(S * r, -1),
                    preferred_element_type=jnp.float32).reshape(-1, S, r)
    mine = (w.token_slots[:, None] == jnp.arange(S, dtype=w.token_slots.dtype))[..., None]
    xa = jnp.where(mine, xa, 0.0).reshape(-1, S * r).astype(w.b.dtype)
    b = jnp.moveaxis(w.b, 0, 1).reshape(w.b.shape[1], S * r)  # [out, S*r]
    y = jnp.einsum("tk,ok->to", xa, b, preferred_element_type=jnp.float32)
    return y.reshape(*lead, -1).astype(out_dtype)


def decoder_targets(params) -> dict[str, tuple[int, int]]:
    """A decoder's (models/decoder.py) targetable modules, by PEFT path -> [out, in]. MoE
    layers' MLPs and quantized projections are left out (an adapter naming them is refused)."""
    shapes = {}
    for i, layer in enumerate(getattr(params, "layers", None) or []):
        for suffix, (block, attr) in _DECODER_TARGETS.items():
            w = getattr(getattr(layer, block, None), attr, None)
            if isinstance(w, (np.ndarray, jax.Array)) and w.ndim == 2:
                shapes[f"model.layers.{i}.{_BLOCK_PATH[block]}.{suffix}"] = tuple(w.shape)
    return shapes


def attach(params, stacks: dict, token_slots: jax.Array):
    """params with each targeted weight wrapped as a LoraWeight (inside the jitted step)."""
    layers = list(params.layers)
    for module, (a, b) in stacks.items():
        _, _, i, block_name, suffix = module.split(".")
        block, attr = _DECODER_TARGETS[suffix]
        layer = layers[int(i)]
        sub = getattr(layer, block)
        sub = dataclasses.replace(sub, **{attr: LoraWeight(getattr(sub, attr), a, b, token_slots)})
        layers[int(i)] = dataclasses.replace(layer, **{block: sub})
    return dataclasses.replace(params, layers=layers)


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_slot(stacks: dict, slot: jax.Array, values: dict) -> dict:
    return {m: (a.at[slot].set(values[m][0]), b.at[slot].set(values[m][1]))
            for m, (a, b) in stacks.items()}


class LoraSlots:
    """The device stacks and the host adapters: max_cpu adapters kept on the host (LRU), at
    most max_loras in device slots 1..max_loras (LRU among those not pinned nor running)."""

    def __init__(self, module_shapes: dict[str, tuple[int, int]], max_loras: int, max_rank: int,
                 max_cpu_loras: int, dtype, sharding=None):
        if max_loras < 1:
            raise LoraError(f"max_loras must be at least 1, got {max_loras}")
        self.module_shapes, self.max_rank = module_shapes, max_rank
        self.max_loras, self.max_cpu = max_loras, max(max_cpu_loras, max_loras)
        S = max_loras + 1
        self.dtype = dtype
        zeros = lambda shape: jnp.zeros(shape, dtype, device=sharding)  # noqa: E731
        self.stacks = {m: (zeros((S, max_rank, inp)), zeros((S, out, max_rank)))
                       for m, (out, inp) in module_shapes.items()}
        self.host: collections.OrderedDict[int, LoraAdapter] = collections.OrderedDict()
        self.slot_of: collections.OrderedDict[int, int] = collections.OrderedDict()  # LRU order
        self.pinned: set[int] = set()
        self.slot_writes = 0

    # -- host side --------------------------------------------------------------------------
    def add(self, lora_id: int, adapter: LoraAdapter) -> None:
        if lora_id <= 0:
            raise LoraError(f"lora ids start at 1, got {lora_id}")
        if adapter.max_rank > self.max_rank:
            raise LoraError(f"adapter {adapter.name}: r={adapter.max_rank} is above "
                            f"--max-lora-rank {self.max_rank}")
        self.host[lora_id] = adapter
        self.host.move_to_end(lora_id)
        if lora_id in self.slot_of:  # reloaded in place: rewrite its slot
            self._write(self.slot_of[lora_id], adapter)
        while len(self.host) > self.max_cpu:
            victim = next((i for i in self.host if i not in self.pinned and i != lora_id), None)
            if victim is None:
                break
            self.remove(victim)

    def remove(self, lora_id: int) -> bool:
        found = self.host.pop(lora_id, None) is not None
        self.slot_of.pop(lora_id, None)  # its slot is free; no token points at it any more
        self.pinned.discard(lora_id)
        return found

    def pin(self, lora_id: int) -> bool:
        if lora_id not in self.host:
            return False
        self.pinned.add(lora_id)
        return True

    def ids(self) -> set[int]:
        return set(self.host)

    # -- device side ------------------------------------------------------------------------
    def slots_for(self, lora_ids: list[int]) -> dict[int, int]:
        """Slots of a step's adapters (0 for none), loading those not in a slot."""
        wanted = list(dict.fromkeys(i for i in lora_ids if i))
        if len(wanted) > self.max_loras:
            raise LoraError(f"{len(wanted)} adapters in one step; --max-loras is {self.max_loras}")
        result = {0: 0}
        for lora_id in wanted:
            if lora_id not in self.host:
                raise LoraError(f"LoRA adapter id {lora_id} is not loaded")
            if lora_id not in self.slot_of:
                self.slot_of[lora_id] = self._free_slot(set(wanted))
                self._write(self.slot_of[lora_id], self.host[lora_id])
            self.slot_of.move_to_end(lora_id)
            self.host.move_to_end(lora_id)
            result[lora_id] = self.slot_of[lora_id]
        return result

    def _free_slot(self, running: set[int]) -> int:
        used = set(self.slot_of.values())
        free = [s for s in range(1, self.max_loras + 1) if s not in used]
        if free:
            return free[0]
        for victim in self.slot_of:  # least recently used first
            if victim not in running and victim not in self.pinned:
                return self.slot_of.pop(victim)
        raise LoraError(f"every one of the {self.max_loras} LoRA slots is pinned or in use")

    def _write(self, slot: int, adapter: LoraAdapter) -> None:
        values = {}
        for m, (out, inp) in self.module_shapes.items():
            a = np.zeros((self.max_rank, inp), np.float32)
            b = np.zeros((out, self.max_rank), np.float32)
            if m in adapter.weights:
                wa, wb = adapter.weights[m]
                a[:wa.shape[0]], b[:, :wb.shape[1]] = wa, wb
            values[m] = (a.astype(self.dtype), b.astype(self.dtype))
        self.stacks = _write_slot(self.stacks, jnp.int32(slot), values)
        self.slot_writes += 1

    def warm_up(self) -> None:
        """Compile the slot write (slot 0 rewritten with zeros: it stays empty)."""
        self._write(0, LoraAdapter("empty", {}))
