"""Adapters on the device, for L = max_loras slots (1..L; slot 0, the base model, holds no
weights), each adapter zero-padded to r = max_rank:

- B per target module: [out, L*r], slot s in columns (s-1)*r .. s*r; and again as
  [L*r, out] in float32 for one-token steps (XLA's CPU backend would otherwise copy B to
  that form every step: batch-1 TPOT overhead +60% -> +22% on SmolLM2, benchmarks/lora.py);
- A per group of a layer's modules that read the same input (q/k/v; gate/up; o and down
  alone): [G, L*r, in], member g's slot s in rows (s-1)*r .. s*r of its [L*r, in].

A MoE layer's experts (peft's target_parameters gate_up_proj and down_proj) keep stacks
laid out as the experts are, [E, in, L*r] for A (gate and up share theirs) and [E, L*r,
out] for B: layers/moe.py runs each (token, expert) row's shrink and expand as grouped
products by expert, beside the base experts' (LoraExperts), the columns masked to the row's
token's slot.

A step carries one slot index per token (0: no adapter). Each targeted projection adds

    delta = mask(x A_group^T)[member's columns] B^T

computed for every slot at once: one dense shrink over the group's G*L*r rows of A (the
group's members each ask for the same product, which XLA's CSE computes once: one product
for q/k/v, one for gate/up), its columns zeroed where they are not the token's own slot,
then one expand per module over its L*r columns of B. No per-token gathers of [r, in]
weights, one program for every mix of adapters, and the cost is T L r (G in + out) per
group against the base products' T in out. A step whose tokens all run without an adapter
takes the base program instead (runner/engine.py): the host knows it when building the step.

Loading an adapter writes its slot with a donated in-place update (one program, compiled
at warm-up; the slot is a traced offset), so adding, swapping and evicting adapters never
compiles. LoraSlots keeps which adapter is in which slot and evicts the least recently
used one that is not pinned and not in the step."""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.loading.safetensors import CheckpointSlices
from xla_inference.lora.peft import LoraAdapter, LoraError
from xla_inference.parallel.pipeline import STAGE_AXIS, StagedLayers
from xla_inference.quantization.packed import PackedWeight

# PEFT module suffix -> (block attribute of a decoder layer, weight attribute in it)
_DECODER_TARGETS = {"q_proj": ("attn", "wq"), "k_proj": ("attn", "wk"), "v_proj": ("attn", "wv"),
                    "o_proj": ("attn", "wo"), "gate_proj": ("mlp", "w_gate"),
                    "up_proj": ("mlp", "w_up"), "down_proj": ("mlp", "w_down")}
_BLOCK_PATH = {"attn": "self_attn", "mlp": "mlp"}
# Modules of one layer that read the same input, whose shrinks are one product (by the
# group's name, which replaces the module suffix in its path).
_SHARED_INPUT = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                 "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraWeight:
    """A base projection weight [out, in] with its group's shrink stack, its own expand
    stack and the step's column mask; layers/linear.project adds the delta for it."""

    base: jax.Array
    a: jax.Array  # [G*L*r, in]: the group's A, every member and slot
    b: jax.Array  # [out, L*r]
    b_rows: jax.Array  # [L*r, out] float32: b for a one-token step (layers/linear.lora_delta)
    column_mask: jax.Array  # [T, L*r] bool: the columns of each token's own slot
    member: int = dataclasses.field(metadata=dict(static=True))  # this module's place in a
    # [] bool, or None (always on): some row's adapter has weights for this module; the
    # LM head's delta (V columns) is skipped otherwise (layers/linear.project).
    active: jax.Array | None = None

    @property
    def shape(self):
        return self.base.shape

    @property
    def dtype(self):
        return self.base.dtype

    def for_microbatch(self, index: jax.Array) -> "LoraWeight":
        """Under pipeline stages the mask holds every micro-batch's tokens, [M, T, L*r]
        (attach_staged); the stage's layers read micro-batch `index`'s (parallel/pipeline.py
        asks, each tick)."""
        if self.column_mask.ndim < 3:
            return self
        mask = jax.lax.dynamic_index_in_dim(self.column_mask, index, keepdims=False)
        return dataclasses.replace(self, column_mask=mask)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraExperts:
    """A MoE layer's stacked experts [E, in, out] (dense or quantized) with each expert's
    adapters for every slot: layers/moe.py adds, to each (token, expert) row of its grouped
    product, (x A_e^T)[the token's slot's columns] B_e^T, both products grouped by expert as
    the base one is."""

    base: jax.Array
    a: jax.Array  # [E, in, L*r]: every slot's A of each expert (gate and up share theirs)
    b: jax.Array  # [E, L*r, out]
    column_mask: jax.Array  # [T, L*r] bool, by token (layers/moe.routed_mlp: by row)
    # [] bool: some token of the step runs an adapter with expert weights; layers/moe.py
    # skips both products otherwise (a step of attention-only adapters pays nothing here).
    active: jax.Array

    @property
    def shape(self):
        return self.base.shape


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraEmbedding:
    """The token embedding [V, D] with its adapters (PEFT's lora_embedding_A [r, V] and
    lora_embedding_B [D, r]): embed_lookup adds each token's A column (its row of a, by
    token id) masked to its slot, times B."""

    base: jax.Array
    a: jax.Array  # [V, L*r]: row v holds every slot's A column for token v
    b: jax.Array  # [D, L*r]
    column_mask: jax.Array  # [T, L*r] bool
    active: jax.Array  # [] bool: some token's adapter adapts the embedding

    @property
    def shape(self):
        return self.base.shape

    @property
    def dtype(self):
        return self.base.dtype


def embed_lookup(embed, ids: jax.Array) -> jax.Array:
    """The embedding rows of token ids [T] -> [T, D], with each token's adapter's delta when
    the embedding is a LoraEmbedding (the step's token ids: its mask is by token). Pipeline
    micro-batches: ids [M, T] -> [M, T, D], the mask [M, T, L*r]."""
    if not isinstance(embed, LoraEmbedding):
        return embed[ids]
    base = embed.base[ids]

    def with_delta():
        rows = jnp.where(embed.column_mask, embed.a[ids], 0).astype(jnp.float32)
        delta = jnp.einsum("...k,dk->...d", rows, embed.b.astype(jnp.float32))
        return base + delta.astype(base.dtype)

    return jax.lax.cond(embed.active, with_delta, lambda: base)


# The vocabulary-sized targets, by PEFT path, outside the decoder layers.
EMBEDDING, LM_HEAD = "model.embed_tokens", "lm_head"


def is_vocab_module(module: str) -> bool:
    return module in (EMBEDDING, LM_HEAD)


def is_expert_module(module: str) -> bool:
    """A MoE layer's experts' projection ("model.layers.1.mlp.experts.gate_proj")."""
    return ".mlp.experts." in module


def group_of(module: str) -> str:
    """The path of the A stack a module's shrink reads (its own path when it shares none)."""
    prefix, _, suffix = module.rpartition(".")
    return f"{prefix}.{_SHARED_INPUT.get(suffix, suffix)}"


def column_mask(token_slots: jax.Array, max_loras: int, max_rank: int) -> jax.Array:
    """[..., T] slots -> [..., T, L*r]: True in the r columns of each token's slot (none for
    slot 0)."""
    column_slot = jnp.arange(max_loras * max_rank, dtype=token_slots.dtype) // max_rank + 1
    return token_slots[..., None] == column_slot


def decoder_targets(params) -> dict[str, tuple[int, int]]:
    """A decoder's (models/decoder.py) targetable modules, by PEFT path -> [out, in]: its
    dense projections, quantized ones included (the base product stays quantized, the
    delta is added in the stacks' dtype: layers/linear.project), and a MoE layer's experts
    ("model.layers.1.mlp.experts.gate_proj" -> [E, out, in]; peft adapts them as the fused
    parameters gate_up_proj and down_proj: lora/peft.py), without a shared expert."""
    shapes = {}
    embed, head = getattr(params, "embed", None), getattr(params, "lm_head", None)
    if isinstance(embed, (np.ndarray, jax.Array)) and embed.ndim == 2:
        shapes[EMBEDDING] = (embed.shape[1], embed.shape[0])  # [out D, in V]
    if _is_projection(head):
        shapes[LM_HEAD] = tuple(head.shape)  # [V, D]
    for i, layer in enumerate(getattr(params, "layers", None) or []):
        for suffix, (block, attr) in _DECODER_TARGETS.items():
            sub = getattr(layer, block, None)
            if hasattr(sub, "router"):  # a MoE layer (layers/moe.MoeMlp): experts [E, in, out]
                experts = getattr(sub, attr)
                if getattr(sub, "shared_expert", None) is None and len(experts.shape) == 3:
                    num, inp, out = experts.shape
                    shapes[f"model.layers.{i}.mlp.experts.{suffix}"] = (num, out, inp)
                continue
            w = getattr(sub, attr, None)
            if _is_projection(w):
                shapes[f"model.layers.{i}.{_BLOCK_PATH[block]}.{suffix}"] = tuple(w.shape)
    return shapes


def restrict_targets(shapes: dict, target_modules) -> dict:
    """The targets vLLM's --lora-target-modules keeps (None: all): a module whose suffix
    ("q_proj"), packed name ("qkv_proj", "gate_up_proj") or full path is listed; a MoE
    layer's experts by "experts" (vLLM's name for the fused-experts module)."""
    if target_modules is None:
        return dict(shapes)
    wanted = set(target_modules)

    def kept(module: str) -> bool:
        if is_expert_module(module):
            return "experts" in wanted or module in wanted
        if is_vocab_module(module):
            return module.rpartition(".")[2] in wanted or module in wanted
        suffix = module.rpartition(".")[2]
        return bool({module, suffix, _SHARED_INPUT.get(suffix)} & wanted)

    return {m: s for m, s in shapes.items() if kept(m)}


def _is_projection(w) -> bool:
    """A [out, in] projection weight: an array, or a quantized one (PackedWeight)."""
    if isinstance(w, (np.ndarray, jax.Array, CheckpointSlices)):
        return w.ndim == 2
    return isinstance(w, PackedWeight)


def weight_sharding(shardings, module: str) -> jax.sharding.NamedSharding:
    """The [out, in] sharding of a decoder's projection at a PEFT module path, from the
    engine's param shardings: a quantized weight's from its values' (parallel/sharding.
    packed_axes: tiles [out, in, ...] or K-major [in, out])."""
    leaf = module_leaf(shardings, module)
    if is_expert_module(module) or not isinstance(leaf, PackedWeight):
        return leaf  # experts [E, in, out] (quantized: PackedExperts; expert_stack_sharding)
    spec = tuple(leaf.values.spec) + (None, None)
    out_in = (spec[1], spec[0]) if getattr(leaf, "k_major", False) else spec[:2]
    return jax.sharding.NamedSharding(leaf.values.mesh, jax.sharding.PartitionSpec(*out_in))


def attach(params, stacks: dict, token_slots: jax.Array, max_rank: int):
    """params with each targeted weight wrapped as a LoraWeight (inside the jitted step).
    stacks: LoraSlots.stacks, {"a": {group: [G, L*r, in]}, "b": {module: [out, L*r]},
    "b_rows": {module: [L*r, out] float32}, and a MoE layer's experts': "ea": {group:
    [E, in, L*r]}, "eb": {module: [E, L*r, out]}}. Pipeline stages (the layers a
    parallel/pipeline.StagedLayers, token_slots [M, T] by micro-batch): _attach_staged."""
    members = group_members(stacks["b"])
    max_loras = stacks["expert_slots"].shape[0] - 1
    mask = column_mask(token_slots, max_loras, max_rank)  # one for every layer
    experts_active = jnp.any(stacks["expert_slots"][token_slots])
    if EMBEDDING in stacks["vocab"]:
        v = stacks["vocab"][EMBEDDING]
        active = jnp.any(stacks["vocab_slots"][EMBEDDING][token_slots])
        params = dataclasses.replace(params, embed=LoraEmbedding(params.embed, v["a"], v["b"],
                                                                 mask, active))
    if isinstance(params.layers, StagedLayers):  # stacks by place (LoraSlots.stage)
        return dataclasses.replace(params, layers=_attach_staged(params.layers, stacks, mask,
                                                                 members))
    layers = list(params.layers)
    for module, b in stacks["eb"].items():
        _, _, i, _, _, suffix = module.split(".")
        attr = _DECODER_TARGETS[suffix][1]
        mlp = layers[int(i)].mlp
        weight = LoraExperts(getattr(mlp, attr), stacks["ea"][group_of(module)], b, mask,
                             experts_active)
        layers[int(i)] = dataclasses.replace(layers[int(i)],
                                             mlp=dataclasses.replace(mlp, **{attr: weight}))
    for module, b in stacks["b"].items():
        _, _, i, _, suffix = module.split(".")
        block, attr = _DECODER_TARGETS[suffix]
        group = group_of(module)
        a = stacks["a"][group]
        layer = layers[int(i)]
        sub = getattr(layer, block)
        weight = LoraWeight(getattr(sub, attr), a.reshape(-1, a.shape[-1]), b,
                            stacks["b_rows"][module], mask, members[group].index(module))
        sub = dataclasses.replace(sub, **{attr: weight})
        layers[int(i)] = dataclasses.replace(layer, **{block: sub})
    return dataclasses.replace(params, layers=layers)


def _attach_staged(staged: StagedLayers, stacks: dict, mask: jax.Array,
                   members: dict[str, list[str]]) -> StagedLayers:
    """Pipeline stages: local layer j of every stage stacked [N, ...] (StagedLayers), and
    LoraSlots holds its adapters stacked the same way already (LoraSlots.stage: keyed
    "j.block.module", stage s's from global layer s * L/N + j, split over the stage axis),
    so the step reads them as they lie. The mask [M, T, L*r] holds every micro-batch's
    tokens; each stage takes the micro-batch it runs in a tick (LoraWeight.for_microbatch),
    so each row's slot travels with it through the stages."""
    local = list(staged.local)
    stages = jax.tree.leaves(staged.local[0])[0].shape[0]
    stage_mask = jnp.broadcast_to(mask, (stages, *mask.shape))
    for place, b in sorted(stacks["b"].items()):
        j, _, suffix = place.split(".")
        block, attr = _DECODER_TARGETS[suffix]
        group = group_of(place)
        a = stacks["a"][group]  # [N, G, L*r, in]
        sub = getattr(local[int(j)], block)
        weight = LoraWeight(getattr(sub, attr), a.reshape(stages, -1, a.shape[-1]), b,
                            stacks["b_rows"][place], stage_mask, members[group].index(place))
        local[int(j)] = dataclasses.replace(
            local[int(j)], **{block: dataclasses.replace(sub, **{attr: weight})})
    return StagedLayers(local)


def stage_places(modules, stages: int, per_stage: int) -> dict[str, list[str]]:
    """The dense target modules by their place in a stage ("model.layers.5.self_attn.q_proj"
    at 2 layers a stage -> "1.self_attn.q_proj"), each place's modules in stage order.
    Every stage's layer must have the same targets: the stages run one program."""
    places: dict[str, dict[int, str]] = {}
    for module in modules:
        _, _, layer, block, suffix = module.split(".")
        stage, j = divmod(int(layer), per_stage)
        places.setdefault(f"{j}.{block}.{suffix}", {})[stage] = module
    for place, by_stage in places.items():
        if sorted(by_stage) != list(range(stages)):
            j, _, suffix = place.split(".")
            raise ValueError(f"pipeline parallel with LoRA adapters needs {suffix} targeted "
                             f"in layer {j} of every stage (--lora-target-modules names "
                             f"the layers of only some)")
    return {place: [by_stage[s] for s in range(stages)] for place, by_stage in places.items()}


def attach_lm_head(params, stacks: dict, row_slots: jax.Array, max_rank: int):
    """params with the LM head wrapped as a LoraWeight for the logits rows whose slots are
    row_slots [B] (each sampled row's token's slot); as is when no adapter targets it."""
    if LM_HEAD not in stacks["vocab"]:
        return params
    v = stacks["vocab"][LM_HEAD]
    mask = column_mask(row_slots, stacks["expert_slots"].shape[0] - 1, max_rank)
    active = jnp.any(stacks["vocab_slots"][LM_HEAD][row_slots])
    return dataclasses.replace(params, lm_head=LoraWeight(params.lm_head, v["a"], v["b"],
                                                          v["b_rows"], mask, 0, active))


def module_leaf(tree, module: str):
    """The leaf of a decoder's params-shaped tree (the params, or their shardings) at a PEFT
    module path ("model.layers.3.self_attn.q_proj" -> tree.layers[3].attn.wq)."""
    if is_vocab_module(module):
        return tree.embed if module == EMBEDDING else tree.lm_head
    *_, suffix = module.split(".")
    block, attr = _DECODER_TARGETS[suffix]
    return getattr(getattr(tree.layers[int(module.split(".")[2])], block), attr)


def group_members(modules) -> dict[str, list[str]]:
    """Each A stack's modules, in their order in it: sorted by path, as a jitted program
    sees a dict's keys."""
    groups: dict[str, list[str]] = {}
    for module in sorted(modules):
        groups.setdefault(group_of(module), []).append(module)
    return groups


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_slot(stacks: dict, offset: jax.Array, slot: jax.Array, values: dict) -> dict:
    """Write one slot's columns of every B and rows of every A (offset = (slot - 1) * r),
    and whether the slot's adapter has expert weights."""
    zero = jnp.zeros((), offset.dtype)

    def at(x, *tail):  # the index of a slot's block, behind any leading (stage) axes
        return (zero,) * (x.ndim - len(tail)) + tail

    return {"expert_slots": stacks["expert_slots"].at[slot].set(values["has_experts"]),
            "vocab_slots": {m: f.at[slot].set(values["vocab_has"][m])
                            for m, f in stacks["vocab_slots"].items()},
            "vocab": {m: {k: (jax.lax.dynamic_update_slice(x, values["vocab"][m][k],
                                                          (offset, zero)) if k == "b_rows"
                              else jax.lax.dynamic_update_slice(x, values["vocab"][m][k],
                                                                (zero, offset)) if k == "b"
                              or m == EMBEDDING
                              else jax.lax.dynamic_update_slice(x, values["vocab"][m][k],
                                                                (offset, zero)))
                          for k, x in v.items()} for m, v in stacks["vocab"].items()},
            "a": {g: jax.lax.dynamic_update_slice(a, values["a"][g], at(a, offset, zero))
                  for g, a in stacks["a"].items()},
            "b": {m: jax.lax.dynamic_update_slice(b, values["b"][m], at(b, zero, offset))
                  for m, b in stacks["b"].items()},
            "b_rows": {m: jax.lax.dynamic_update_slice(
                b, jnp.swapaxes(values["b"][m], -1, -2).astype(b.dtype), at(b, offset, zero))
                for m, b in stacks["b_rows"].items()},
            "ea": {g: jax.lax.dynamic_update_slice(a, values["ea"][g], (zero, zero, offset))
                   for g, a in stacks["ea"].items()},
            "eb": {m: jax.lax.dynamic_update_slice(b, values["eb"][m], (zero, offset, zero))
                   for m, b in stacks["eb"].items()}}


def expert_stack_sharding(experts, a: bool) -> jax.sharding.NamedSharding:
    """An expert adapter stack's sharding (LoraSlots.place): A [E, in, L*r] (`a`) or B
    [E, L*r, out] split as the experts [E, in, out] beside it are (`experts`: their
    NamedSharding, or a quantized stack's PackedExperts of them); beside quantized experts
    (values, scales, offsets: their own layouts) by their values' expert axis alone, which
    every layout keeps first (under data parallel the quantized experts split across the
    replicas by expert only; under tensor parallel by expert where E divides, else by width,
    the stacks then whole on every device)."""
    if not isinstance(experts, jax.sharding.NamedSharding):
        values = experts.values
        e = (tuple(values.spec) + (None,))[0]
        return jax.sharding.NamedSharding(values.mesh, jax.sharding.PartitionSpec(e))
    e, inp, out = (tuple(experts.spec) + (None,) * 3)[:3]
    axes = (e, inp, None) if a else (e, None, out)
    return jax.sharding.NamedSharding(experts.mesh, jax.sharding.PartitionSpec(*axes))


class LoraSlots:
    """The device stacks and the host adapters: max_cpu adapters kept on the host (LRU), at
    most max_loras in device slots 1..max_loras (LRU among those not pinned nor running)."""

    def __init__(self, module_shapes: dict[str, tuple[int, int]], max_loras: int, max_rank: int,
                 max_cpu_loras: int, dtype, sharding=None, target_modules=None):
        if max_loras < 1:
            raise LoraError(f"max_loras must be at least 1, got {max_loras}")
        # --lora-target-modules (None: every target), named when an adapter reaches past it
        self.target_modules = target_modules
        self.module_shapes, self.max_rank = module_shapes, max_rank
        self.max_loras, self.max_cpu = max_loras, max(max_cpu_loras, max_loras)
        self.dtype = dtype
        dense = {m: s for m, s in module_shapes.items()
                 if not is_expert_module(m) and not is_vocab_module(m)}
        vocab = {m: s for m, s in module_shapes.items() if is_vocab_module(m)}
        experts = {m: s for m, s in module_shapes.items() if is_expert_module(m)}
        self.groups = group_members(dense)
        self.expert_groups = group_members(experts)
        columns = max_loras * max_rank
        zeros = lambda shape: jnp.zeros(shape, dtype, device=sharding)  # noqa: E731
        self.stacks = {
            # [L+1] bool: which slots' adapters have expert weights (slot 0, none, never).
            "expert_slots": jnp.zeros((max_loras + 1,), bool, device=sharding),
            # The embedding's A by token [V, L*r] and B [D, L*r]; the LM head's as a
            # projection's (A [L*r, D], B [V, L*r] and [L*r, V] float32), and which slots'
            # adapters have weights for each (their deltas run only when some token's has).
            "vocab_slots": {m: jnp.zeros((max_loras + 1,), bool, device=sharding) for m in vocab},
            "vocab": {m: self._vocab_zeros(m, out, inp, columns, sharding)
                      for m, (out, inp) in vocab.items()},
            "a": {g: zeros((len(ms), columns, module_shapes[ms[0]][1]))
                  for g, ms in self.groups.items()},
            "b": {m: zeros((out, columns)) for m, (out, _) in dense.items()},
            # B again, [L*r, out] in float32: a one-token step's expand reads it as is
            # (from B, XLA's CPU backend copies it so every step).
            "b_rows": {m: jnp.zeros((columns, out), jnp.float32, device=sharding)
                       for m, (out, _) in dense.items()},
            # A MoE layer's experts, laid out as their weights [E, in, out] for the grouped
            # products; one A for gate and up (peft adapts them fused as gate_up_proj).
            "ea": {g: zeros((experts[ms[0]][0], experts[ms[0]][2], columns))
                   for g, ms in self.expert_groups.items()},
            "eb": {m: zeros((num, columns, out)) for m, (num, out, _) in experts.items()}}
        self.host: collections.OrderedDict[int, LoraAdapter] = collections.OrderedDict()
        self.slot_of: collections.OrderedDict[int, int] = collections.OrderedDict()  # LRU order
        self.pinned: set[int] = set()
        self.slot_writes = 0
        self._write_program = _write_slot
        # Under pipeline stages (stage()): each place in a stage's layers -> its modules,
        # stage by stage; the dense stacks are kept by place, [N, ...].
        self.places: dict[str, list[str]] | None = None

    def stage(self, stages: int, per_stage: int) -> None:
        """Hold the dense layers' stacks as the pipeline stages' layers are held
        (parallel/pipeline.StagedLayers): by place in a stage ("0.self_attn.q_proj"), every
        stage's [N, ...] stacked on a leading axis, so a step reads them as they lie
        (lora/slots._attach_staged) and place() splits them over the stage axis. Before
        place(); slot writes write each stage's block."""
        if self.stacks["eb"]:
            raise ValueError("pipeline parallel serves LoRA adapters on dense layers only")
        self.places = stage_places(self.stacks["b"], stages, per_stage)
        group_places = {group_of(place): [group_of(m) for m in modules]
                        for place, modules in self.places.items()}
        self.stacks["a"] = {g: jnp.stack([self.stacks["a"][m] for m in groups])
                            for g, groups in group_places.items()}
        for kind in ("b", "b_rows"):
            self.stacks[kind] = {place: jnp.stack([self.stacks[kind][m] for m in modules])
                                 for place, modules in self.places.items()}

    def _vocab_zeros(self, module: str, out: int, inp: int, columns: int, sharding) -> dict:
        zeros = lambda shape, dtype=self.dtype: jnp.zeros(shape, dtype, device=sharding)  # noqa: E731
        if module == EMBEDDING:  # [out D, in V]
            return {"a": zeros((inp, columns)), "b": zeros((out, columns))}
        return {"a": zeros((columns, inp)), "b": zeros((out, columns)),
                "b_rows": zeros((columns, out), jnp.float32)}

    def place(self, weight_sharding) -> dict:
        """Split the stacks over a tensor-parallel mesh as their base weights are split, and
        return their shardings. weight_sharding(module path) -> the base [out, in] weight's
        NamedSharding. B [out, L*r] follows the weight's output axis (column-parallel
        q/k/v/gate/up: each device expands into its own output columns); A [G, L*r, in] its
        input axis (row-parallel o/down: each device shrinks its share of the input and
        GSPMD sums the partial [T, L*r] products, a few columns only). Slot writes keep
        these shardings (no recompile, no gather)."""
        def split(module):
            spec = tuple(weight_sharding(module).spec) + (None, None)
            return weight_sharding(module).mesh, spec[0], spec[1]

        def sharding(module, *axes):
            mesh = split(module)[0]
            return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))

        mesh = jax.tree.leaves(weight_sharding(next(iter(self.module_shapes))))[0].mesh
        whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        shardings = {
            "expert_slots": whole,
            # The vocabulary-sized stacks stay whole on every device (a few L*r columns).
            "vocab_slots": {m: whole for m in self.stacks["vocab_slots"]},
            "vocab": jax.tree.map(lambda _: whole, self.stacks["vocab"]),
            **self._dense_shardings(split, sharding),
            "ea": {g: expert_stack_sharding(weight_sharding(ms[0]), True)
                   for g, ms in self.expert_groups.items()},
            "eb": {m: expert_stack_sharding(weight_sharding(m), False)
                   for m in self.stacks["eb"]}}
        self.stacks = jax.device_put(self.stacks, shardings)
        self._write_program = jax.jit(_write_slot.__wrapped__, donate_argnums=(0,),
                                      out_shardings=shardings)
        return shardings

    def _dense_shardings(self, split, sharding) -> dict:
        """The dense stacks' shardings (place()): by module as their weights; under
        pipeline stages by place, the stage axis in front (each stage's devices hold its
        own layers' adapters), split over the model axis as stage 0's layer's weight."""
        if self.places is None:
            return {"a": {g: sharding(ms[0], None, None, split(ms[0])[2])
                          for g, ms in self.groups.items()},
                    "b": {m: sharding(m, split(m)[1], None) for m in self.stacks["b"]},
                    "b_rows": {m: sharding(m, None, split(m)[1]) for m in self.stacks["b_rows"]}}
        first = {place: modules[0] for place, modules in self.places.items()}
        groups = {group_of(place): first[place] for place in sorted(first, reverse=True)}
        return {"a": {g: sharding(m, STAGE_AXIS, None, None, split(m)[2])
                      for g, m in groups.items()},
                "b": {p: sharding(m, STAGE_AXIS, split(m)[1], None) for p, m in first.items()},
                "b_rows": {p: sharding(m, STAGE_AXIS, None, split(m)[1])
                           for p, m in first.items()}}

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
        """Slot `slot` (1..max_loras) of every stack holds `adapter` (zeros where it has no
        weights for a module, or beyond its rank)."""
        r = self.max_rank
        values = {"a": {}, "b": {}}
        for group, modules in self.groups.items():
            a = np.zeros((len(modules), r, self.module_shapes[modules[0]][1]), np.float32)
            for g, m in enumerate(modules):
                b = np.zeros((self.module_shapes[m][0], r), np.float32)
                if m in adapter.weights:
                    wa, wb = adapter.weights[m]
                    a[g, :wa.shape[0]], b[:, :wb.shape[1]] = wa, wb
                values["b"][m] = b.astype(self.dtype)
            values["a"][group] = a.astype(self.dtype)
        if self.places is not None:  # by place, every stage's block stacked (stage())
            values["b"] = {place: np.stack([values["b"][m] for m in modules])
                           for place, modules in self.places.items()}
            values["a"] = {group_of(place): np.stack([values["a"][group_of(m)] for m in modules])
                           for place, modules in self.places.items()}
        values["ea"], values["eb"] = self._expert_values(adapter)
        values["vocab"], values["vocab_has"] = self._vocab_values(adapter)
        values["has_experts"] = jnp.bool_(any(is_expert_module(m) and m in self.module_shapes
                                              for m in adapter.weights))
        self.stacks = self._write_program(self.stacks, jnp.int32((slot - 1) * r), jnp.int32(slot),
                                          values)
        self.slot_writes += 1

    def _vocab_values(self, adapter: LoraAdapter) -> tuple[dict, dict]:
        """One slot's embedding and LM head stacks (zeros where the adapter has none), and
        whether it has each."""
        r, values, has = self.max_rank, {}, {}
        for m in self.stacks["vocab"]:
            out, inp = self.module_shapes[m]
            a, b = np.zeros((r, inp), np.float32), np.zeros((out, r), np.float32)
            if m in adapter.weights:
                wa, wb = adapter.weights[m]
                a[:wa.shape[0]], b[:, :wb.shape[1]] = wa, wb
            has[m] = jnp.bool_(m in adapter.weights)
            values[m] = {"a": (a.T if m == EMBEDDING else a).astype(self.dtype),
                         "b": b.astype(self.dtype)}
            if m == LM_HEAD:
                values[m]["b_rows"] = b.T.astype(np.float32)
        return values, has

    def _expert_values(self, adapter: LoraAdapter) -> tuple[dict, dict]:
        """One slot's A [E, in, r] per expert group and B [E, r, out] per expert module
        (the group's members share their A: peft's fused gate_up_proj)."""
        r, ea, eb = self.max_rank, {}, {}
        for group, modules in self.expert_groups.items():
            num, _, inp = self.module_shapes[modules[0]]
            a = np.zeros((num, inp, r), np.float32)
            for m in modules:
                num, out, _ = self.module_shapes[m]
                b = np.zeros((num, r, out), np.float32)
                if m in adapter.weights:
                    wa, wb = adapter.weights[m]  # [E, rank, in], [E, out, rank]
                    a[:, :, :wa.shape[1]] = wa.transpose(0, 2, 1)
                    b[:, :wb.shape[2]] = wb.transpose(0, 2, 1)
                eb[m] = b.astype(self.dtype)
            ea[group] = a.astype(self.dtype)
        return ea, eb

    def warm_up(self) -> None:
        """Compile the slot write: slot 1 rewritten with what it holds (zeros if nothing)."""
        in_slot_1 = [i for i, s in self.slot_of.items() if s == 1]
        self._write(1, self.host[in_slot_1[0]] if in_slot_1 else LoraAdapter("empty", {}))
