"""Mixture-of-experts feed-forward blocks (Mixtral, Qwen3-MoE): a softmax router picks
k experts per token, each a SwiGLU MLP; the token's output is their weighted sum.

`moe_mlp` computes only the chosen experts: the T * k (token, expert) pairs are sorted by
expert and run through grouped matmuls, whose shapes are static whatever the routing: on
a TPU or GPU the Pallas GMM (kernels/pallas_gmm.py), on the CPU a loop over the GMM's
work list (kernels/xla_gmm.py: each row times its own expert; rows outside every group
skipped) where no mesh axis is left to GSPMD, else `jax.lax.ragged_dot` (or, with fewer
rows than experts, each row times its gathered expert). `moe_mlp_dense` runs
every expert on every token and masks the result by the routing: the reference the
grouped path is tested against. A step's padding tokens (AttentionMetadata.real_tokens)
route to no expert (`without_padding`): they take no rows of any group.

Llama 4 routes otherwise: a sigmoid of each chosen expert's logit (no softmax) scales the
token before the expert rather than the expert's output, and a shared expert, a plain
SwiGLU MLP, sees every token (`scoring`, `weight_inputs`, `MoeMlp.shared_expert`).

Quantized experts (quantization/experts.PackedExperts: a quantized checkpoint's, or online
int8 / fp8) take that module's grouped product: on a TPU or GPU the Pallas GMM over the
experts as the loader stored them (its K-major layout), elsewhere dequantized in the step.

DeepSeek-V3 (and Kimi-K2) route with `scoring="grouped_sigmoid"` (DeepSeek's "noaux_tc"): a
sigmoid score per expert; a learned per-expert bias shifts the scores used for choosing only;
experts come in `num_groups` groups, of which the `topk_groups` with the best two (biased)
scores per group are eligible; the chosen experts' unbiased scores, optionally renormalised,
times `routed_scaling_factor` weight their outputs. Its shared experts are `shared_expert`.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from xla_inference import envs
from xla_inference.kernels import pallas_gmm, xla_gmm
from xla_inference.layers.mlp import GatedMlp, gated_mlp
from xla_inference.lora.slots import LoraExperts
from xla_inference.parallel.axes import weight
from xla_inference.parallel.sharding import (DATA_AXIS, REPLICAS_AND_TENSOR, TENSOR_AXIS,
                                             left_to_gspmd, refuse_nested_interpret_callbacks,
                                             tensor_parallel_mesh)
from xla_inference.quantization.experts import (PackedExperts, expert_weights, local_share,
                                                ragged_product, row_experts,
                                                share_splits_groups, uses_native_kernel)


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    num_experts_per_tok: int  # k
    intermediate_size: int  # F of each expert
    norm_topk_prob: bool  # rescale the k chosen probabilities to sum to 1 (Mixtral always does)
    scoring: str = "softmax"  # or "sigmoid" of each chosen logit (Llama 4), or "grouped_sigmoid"
    weight_inputs: bool = False  # weight a token before the expert, not its output (Llama 4)
    num_groups: int = 1  # "grouped_sigmoid": experts split into this many equal groups
    topk_groups: int = 1  # "grouped_sigmoid": groups a token may choose experts from
    routed_scaling_factor: float = 1.0  # "grouped_sigmoid": scales the routing weights


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MoeMlp:
    """One MoE block's weights, experts stacked on a leading axis (the `experts` sharding axis)."""

    router: jax.Array  # [D, E], replicated
    # [E, D, F] / [E, F, D], dense or quantized (PackedExperts, same logical shape)
    w_gate: jax.Array | PackedExperts = weight("experts", "embed", "mlp")
    w_up: jax.Array | PackedExperts = weight("experts", "embed", "mlp")
    w_down: jax.Array | PackedExperts = weight("experts", "mlp", "embed")
    shared_expert: GatedMlp | None = None  # [D, F'] / [F', D]: sees every token (Llama 4)
    score_bias: jax.Array | None = None  # [E] float32: added to the scores for choosing only


class Experts(NamedTuple):
    """A block's three stacked expert weights, [E, D, F], [E, D, F] and [E, F, D]."""

    gate: jax.Array | PackedExperts
    up: jax.Array | PackedExperts
    down: jax.Array | PackedExperts

    @property
    def count(self) -> int:
        return self.gate.shape[0]


def route(p: MoeMlp, x: jax.Array, cfg: MoeConfig) -> tuple[jax.Array, jax.Array]:
    """x [T, D] -> (weights [T, k] float32, experts [T, k] int32), best expert first.

    As transformers does: softmax over all experts in float32, then the top k, then (if
    configured) renormalisation over those k.
    """
    if cfg.scoring == "grouped_sigmoid":
        return _route_grouped_sigmoid(p, x, cfg)
    logits = jnp.einsum("TD,DE->TE", x, p.router)
    if cfg.scoring == "sigmoid":
        return _route_sigmoid(logits, cfg)
    return softmax_top_k(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)


def softmax_top_k(logits: jax.Array, k: int, renormalize: bool
                  ) -> tuple[jax.Array, jax.Array]:
    """Router logits [T, E] -> (weights [T, k] float32, experts [T, k] int32): softmax over
    all experts in float32, the top k, then (if `renormalize`) rescaled to sum to 1."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def _route_sigmoid(logits: jax.Array, cfg: MoeConfig) -> tuple[jax.Array, jax.Array]:
    """Llama 4's router: the top k logits, each through a sigmoid in float32. The top k
    are taken on the logits themselves: sigmoids of large logits saturate to equal 1.0s."""
    top_logits, experts = jax.lax.top_k(logits, cfg.num_experts_per_tok)
    weights = jax.nn.sigmoid(top_logits.astype(jnp.float32)).astype(logits.dtype)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights.astype(jnp.float32), experts.astype(jnp.int32)


def _route_grouped_sigmoid(p: MoeMlp, x: jax.Array, cfg: MoeConfig
                           ) -> tuple[jax.Array, jax.Array]:
    """DeepSeek-V3's router, in float32 throughout as transformers runs it."""
    logits = jnp.einsum("TD,DE->TE", x.astype(jnp.float32), p.router.astype(jnp.float32))
    return grouped_sigmoid_top_k(logits, p.score_bias, cfg)


def grouped_sigmoid_top_k(logits: jax.Array, score_bias: jax.Array | None, cfg: MoeConfig
                          ) -> tuple[jax.Array, jax.Array]:
    """Router logits [T, E] -> (weights [T, k] float32, experts [T, k] int32) as
    `scoring="grouped_sigmoid"` routes (the module docstring)."""
    T, E = logits.shape[0], cfg.num_experts
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    biased = scores if score_bias is None else scores + score_bias.astype(jnp.float32)
    if cfg.num_groups > 1:
        grouped = biased.reshape(T, cfg.num_groups, E // cfg.num_groups)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(axis=-1)  # [T, groups]
        _, best_groups = jax.lax.top_k(group_scores, cfg.topk_groups)
        eligible = jax.nn.one_hot(best_groups, cfg.num_groups, dtype=bool).any(axis=1)
        biased = jnp.where(jnp.repeat(eligible, E // cfg.num_groups, axis=1), biased, -jnp.inf)
    _, experts = jax.lax.top_k(biased, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, experts.astype(jnp.int32)


def _with_shared_expert(p: MoeMlp, x: jax.Array, routed: jax.Array) -> jax.Array:
    return routed if p.shared_expert is None else gated_mlp(p.shared_expert, x) + routed


def _grouped(xs: jax.Array, w: jax.Array | PackedExperts, group_sizes: jax.Array) -> jax.Array:
    """xs [R, in], rows sorted by expert (group_sizes [E] of them each), times each row's
    expert of w [E, in, out] -> [R, out]."""
    if isinstance(w, LoraExperts):  # plus each row's adapter for its expert (lora/slots.py)
        base = _grouped(xs, w.base, group_sizes)
        # Only when some token's adapter has expert weights (a runtime branch: one program).
        return jax.lax.cond(w.active, lambda: base + _expert_delta(xs, w, group_sizes),
                            lambda: base)
    if isinstance(w, PackedExperts):
        return ragged_product(xs, w, group_sizes)
    route = pallas_gmm.gmm_route()
    if route is not None:  # a TPU or GPU: the Pallas GMM reads only the experts with rows
        return pallas_gmm.gmm(xs, w, group_sizes, backend=route.backend,
                              interpret=route.interpret)
    if not left_to_gspmd(w):
        # The work-list loop (kernels/xla_gmm.py): each row times its own expert, read in
        # place; rows outside every group (padding) cost nothing. 128 experts [1024, 384],
        # float32, the loaded 2-core machine: 512 rows 100 ms against ragged_dot's 2 s
        # (every row times every expert on XLA's CPU); 64 rows 18 ms against 157 ms
        # gathered (below). Where GSPMD partitions the step (the context mesh's, else the
        # experts' own mesh: a jit without traced_over) it would gather the experts the
        # loop reads by a dynamic index: ragged_dot and the gather stay there.
        return xla_gmm.gmm(xs, w, group_sizes).astype(xs.dtype)
    if xs.shape[0] < w.shape[0]:
        # Fewer rows than experts (decode): each row times its own expert, gathered. XLA's
        # CPU ragged_dot multiplies every row by every expert (a decode step of E = 128
        # experts, D = 1024, F = 384, float32, 2 cores: 700 ms against 27 ms gathered).
        weights = jnp.take(w, row_experts(group_sizes, xs.shape[0]), axis=0)  # [R, in, out]
        return jnp.einsum("ri,rio->ro", xs, weights).astype(xs.dtype)
    return jax.lax.ragged_dot(xs, w, group_sizes)


def _expert_delta(xs: jax.Array, w: LoraExperts, group_sizes: jax.Array) -> jax.Array:
    """Each sorted row's adapter delta for its expert: (x A_e^T)[the row's slot] B_e^T.
    In the stacks' dtype (the projections': bfloat16 against float32 activations on the
    host CPU), rounding the rows rather than converting the stacks every step."""
    shrunk = _grouped(xs.astype(w.a.dtype), w.a, group_sizes)  # [R, L*r]: every slot
    mine = jnp.where(w.column_mask, shrunk, 0.0).astype(w.b.dtype)  # (gate, up: one)
    return _grouped(mine, w.b, group_sizes).astype(xs.dtype)


def _swiglu_grouped(w: Experts, xs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """xs [R, D], rows sorted by expert, group_sizes [E] -> [R, D]: row r through its expert."""
    gate = _grouped(xs, w.gate, group_sizes)  # [R, F]
    up = _grouped(xs, w.up, group_sizes)
    return _grouped(jax.nn.silu(gate) * up, w.down, group_sizes)


def moe_mlp(p: MoeMlp, x: jax.Array, cfg: MoeConfig, real_tokens: jax.Array | None = None
            ) -> jax.Array:
    """x [T, D] -> [T, D]: each token through its k experts, weighted by the routing.
    real_tokens [T] bool (the step's tokens, not its padding; None: all): the others are
    routed to no expert (without_padding), their routed sum zero."""
    weights, experts = route(p, x, cfg)
    return routed_mlp(p, x, weights, experts, cfg, real_tokens)


def without_padding(weights: jax.Array, experts: jax.Array, real_tokens: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """The routing (weights, experts [T, k]) with padding tokens' choices made expert -1,
    weight 0. A padded step (the token bucket's tail; under data parallel an idle replica's
    whole batch, gathered with the others') would otherwise route its rows as tokens: they
    would take rows in the experts' groups (the grouped matmul multiplies them, the Pallas
    GMM reads experts only they chose), seats in the all-to-all dispatch's capacity (an
    overflow sends the whole step to the all-reduce path) and shift the groups' tiles.
    Expert -1 sorts past every group: no work, a zero row."""
    real = real_tokens[:, None]
    return jnp.where(real, weights, 0), jnp.where(real, experts, -1)


def routed_mlp(p: MoeMlp, x: jax.Array, weights: jax.Array, experts: jax.Array,
               cfg: MoeConfig, real_tokens: jax.Array | None = None) -> jax.Array:
    """x [T, D] through the experts a router chose (weights, experts [T, k], as `route`
    gives them) -> [T, D]; p.router is not read (the torch path routes outside, and
    passes the step's real_tokens as the native families do: padding routed to no expert,
    `without_padding`).
    Under a tensor-parallel mesh with a kernel that has no partitioning rule serving the
    experts (the Pallas GMM; the native CPU kernel where the experts split), or the
    all-to-all dispatch forced, split by hand (_routed_on_mesh), LoRA experts' adapter
    stacks with them."""
    if real_tokens is not None:
        weights, experts = without_padding(weights, experts, real_tokens)
    w = Experts(p.w_gate, p.w_up, p.w_down)
    across = _split_across_replicas(w, cfg)
    mesh = _mesh_to_split_on(w)
    if across is not None:
        routed = _routed_across_replicas(w, x, weights, experts, cfg, across)
    elif mesh is None:
        routed = _routed_experts(w, x, weights, experts, cfg)
    else:
        routed = _routed_on_mesh(w, x, weights, experts, cfg, mesh)
    return _with_shared_expert(p, x, routed)


def _mesh_to_split_on(w: Experts):
    """The tensor-parallel mesh where routed_mlp splits the experts by hand, else None
    (GSPMD partitions XLA's ragged_dot without gathering the weights, not a custom call).
    The native CPU kernel's tiles split only by experts (local_share): where they do not,
    GSPMD keeps them as before."""
    mesh = tensor_parallel_mesh()
    if mesh is None:
        return None
    if pallas_gmm.gmm_route() is not None or envs.moe_dispatch() == "all-to-all":
        return mesh
    native = any(uses_native_kernel(_base(a)) for a in w)
    return mesh if native and _expert_split(w, mesh.shape[TENSOR_AXIS]) == "experts" else None


def _routed_experts(w: Experts, x: jax.Array, weights: jax.Array, experts: jax.Array,
                    cfg: MoeConfig, first_expert: jax.Array | None = None) -> jax.Array:
    """The routed sum [T, D] over the experts w holds; a pair of expert -1 (padding) takes
    no row of any group. `first_expert` (expert parallel):
    w holds experts first_expert .. first_expert + w.count - 1 only; the (token, expert)
    pairs of other experts sort after them, past the groups (the grouped products leave
    such rows zero or, gathered per row, multiply them by a stand-in expert), and their
    outputs are dropped: the sum of this device's experts' share."""
    T, D = x.shape
    k = cfg.num_experts_per_tok
    flat_experts = experts.reshape(T * k)  # pair r = t * k + j: token t's j-th choice
    local = flat_experts if first_expert is None else flat_experts - first_expert
    # Expert -1 (padding: without_padding) is no device's.
    mine = (flat_experts >= 0) & (local >= 0) & (local < w.count)
    group_of = jnp.where(mine, local, w.count)  # other devices' pairs: one group past
    order = jnp.argsort(group_of, stable=True)  # pairs grouped by expert
    group_sizes = jnp.bincount(group_of, length=w.count + 1)[:w.count].astype(jnp.int32)
    xs = x[order // k]  # [T*k, D] in sorted order
    w = _rows_of_adapters(w, order // k)
    if cfg.weight_inputs:
        xs = xs * weights.reshape(T * k)[order][:, None].astype(x.dtype)
        weights = jnp.ones_like(weights)
    out = _swiglu_grouped(w, xs, group_sizes)
    unsorted = jnp.where(mine[:, None], jnp.zeros_like(out).at[order].set(out), 0)
    unsorted = unsorted.reshape(T, k, D)
    return (unsorted * weights[..., None].astype(out.dtype)).sum(axis=1)


# ------------------------------------------------------------------ expert / tensor parallel
#
# A Pallas call has no partitioning rule: left to GSPMD, a GMM over experts sharded on the
# tensor-parallel axis gathers every expert's weights whole onto every device, each layer,
# each step. So the routed experts run in a shard_map over that axis, each device's GMM on
# the weights it holds, as parallel/sharding.py placed them:
# - experts split (expert parallel, E divisible by the axis): every device sees every
#   token (the activations are replicated between layers under tensor parallel) and runs
#   the (token, expert) pairs of its own experts; the others' pairs sort past its groups
#   and are dropped (_routed_experts). The partial sums meet in one all-reduce of [T, D];
# - else the intermediate width split (tensor parallel): gate and up column-parallel, down
#   row-parallel, routing replicated; the partial sums meet in the same all-reduce;
# - else (a share the kernel cannot take alone) every device multiplies the whole
#   experts, gathered, as GSPMD would.
# Quantized experts split with their scales and offsets (quantization/experts.py's
# local_share). LoRA experts (lora/slots.LoraExperts) split with their adapter stacks, cut
# where LoraSlots.place put them: A [E, in, L*r] and B [E, L*r, out] by expert under the
# expert split; under the width split gate's and up's B by output (A whole: every device
# shrinks the whole input, expands into its own columns) and down's A by input (B whole:
# each device's delta is a partial sum, reduced with the base's). The adapters cannot be
# added outside the split: gate's and up's deltas go through the SwiGLU before down.
# A deployment with many devices and large batches would rather shard the tokens too and
# exchange only each pair's rows (all-to-all dispatch and combine): every
# device here reads all T * k pair rows and reduces [T, D]; at decode sizes that is small
# against the expert weights each device no longer reads.


def _routed_on_mesh(w: Experts, x: jax.Array, weights: jax.Array, experts: jax.Array,
                    cfg: MoeConfig, mesh, across: str | None = None) -> jax.Array:
    """`across` (_routed_across_replicas): w is this replica's cut of experts split over
    the data and model axes together by `across`; x holds every replica's tokens [R * T],
    the shares meet over both axes (device d * model + m holds share d * model + m), and
    the result is this replica's rows [T]."""
    devices = mesh.shape[TENSOR_AXIS]
    split = _expert_split(w, devices) if across is None else across
    local = w if split is None else Experts(*(local_share(_base(a), split, axis, devices)
                                              for a, axis in zip(w, _SPLIT_AXES[split])))
    specs = Experts(*(_share_spec(a, local_a, split, axis)
                      for a, local_a, axis in zip(w, local, _SPLIT_AXES.get(split, (0,) * 3))))
    axes, group = TENSOR_AXIS, devices  # the devices the shares meet over
    if across is not None:
        axes, group = REPLICAS_AND_TENSOR, devices * mesh.shape[DATA_AXIS]

    capacity = _dispatch_capacity(w, x.shape[0], cfg.num_experts_per_tok, group, split,
                                  group // devices)

    def body(x, weights, experts, shares):
        shares = Experts(*(_with_static(share, a) for share, a in zip(shares, local)))
        if capacity is not None:
            routed = _dispatched_experts(shares, x, weights, experts, cfg, group, capacity, axes)
            return routed if across is None else _own_replica_rows(routed)
        if split == "experts":
            first = jax.lax.axis_index(axes) * shares.count
            partial = _routed_experts(shares, x, weights, experts, cfg, first)
        else:
            partial = _routed_experts(shares, x, weights, experts, cfg)
        if across is not None:  # every replica's rows: each replica keeps the sums of its own
            mine = jax.lax.psum_scatter(partial, DATA_AXIS, scatter_dimension=0, tiled=True)
            return jax.lax.psum(mine, TENSOR_AXIS)
        return partial if split is None else jax.lax.psum(partial, axes)

    # Manual over every axis not yet manual, as quantization/product.py's split: the TPU
    # kernel's interpret mode runs host callbacks, which JAX allows only in manual code.
    route = pallas_gmm.gmm_route()
    if route is not None and route.backend == "tpu" and route.interpret:
        refuse_nested_interpret_callbacks(mesh, "the TPU GMM")
    still_auto = set(mesh.axis_names) - set(mesh.manual_axes)
    whole = PartitionSpec()
    return jax.shard_map(body, mesh=mesh, in_specs=(whole, whole, whole, specs),
                         out_specs=whole, axis_names=still_auto, check_vma=False)(
                             x, weights, experts, w)


# ------------------------------------------------------------------ across data parallel replicas
#
# MoE under data parallel (vLLM's "DP attention + expert parallel"): each replica runs its
# own tokens through attention on its data slice (runner/engine._forward_replicas, manual
# over the data axis), while the routed experts split over all R x M devices of the mesh
# (parallel/sharding.expert_spec): by expert, or by the intermediate width. Inside the
# replica a block then holds 1/R of the experts' data cut, so it takes every replica's
# tokens (all-gathered over the data axis: the replicas' batches are padded alike) and runs
# _routed_on_mesh over the model axis with the shares meeting over both axes: the partial
# sums reduce-scattered over the data axis (each replica its own rows) then all-reduced
# over the model axis, or the all-to-all dispatch over both axes (each replica then keeps
# its own rows of the gathered result). The replicas step in lockstep
# by construction: one program; a replica without requests runs its padding, which routes
# to no expert (without_padding: the gathered rows of an idle replica cost no expert work).
# Quantized experts (PackedExperts) split across the replicas by expert only, whatever the
# preference: values, scales and offsets cut on the expert axis, which every layout (the
# native kernel's tiles, FP8's [out, in], the Pallas K-major) takes whole; a width cut of
# the tiles is not a share any product takes alone. Where the experts do not divide over
# every device, each replica keeps the model axis' split, as dense ones.


def _split_across_replicas(w: Experts, cfg: MoeConfig) -> str | None:
    """"experts" or "mlp" where w is a data parallel replica's cut of experts split across
    the replicas (its shapes tell: fewer experts, or a narrower width, than the config's);
    None where each replica holds its experts whole over the data axis. Quantized experts
    (PackedExperts) split by expert only (parallel/sharding.expert_spec), LoRA adapters'
    stacks beside them with them (lora/slots.LoraSlots.place)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.manual_axes or mesh.shape[DATA_AXIS] == 1:
        return None
    if w.count < cfg.num_experts:
        return "experts"
    dense = all(isinstance(_base(a), jax.Array) for a in w)
    return "mlp" if dense and w.gate.shape[2] < cfg.intermediate_size else None


def _routed_across_replicas(w: Experts, x: jax.Array, weights: jax.Array, experts: jax.Array,
                            cfg: MoeConfig, across: str) -> jax.Array:
    """x [T, D], this replica's tokens -> their routed sum [T, D] (the comment above)."""
    mesh = jax.sharding.get_abstract_mesh()
    everyone = [jax.lax.all_gather(a, DATA_AXIS, tiled=True) for a in (x, weights, experts)]
    return _routed_on_mesh(Experts(*(_every_replicas_adapters(a) for a in w)), *everyone, cfg,
                           mesh, across)


def _every_replicas_adapters(w):
    """LoRA experts (lora/slots.LoraExperts) as every replica's tokens need them: each
    replica's tokens' column masks, gathered in the order of the gathered tokens, and
    their products run where any replica's token has an expert adapter (each device
    computes every replica's rows of its share of the experts)."""
    if not isinstance(w, LoraExperts):
        return w
    mask = jax.lax.all_gather(w.column_mask, DATA_AXIS, tiled=True)
    active = jax.lax.pmax(w.active.astype(jnp.int32), DATA_AXIS) > 0
    return dataclasses.replace(w, column_mask=mask, active=active)


def _own_replica_rows(routed: jax.Array) -> jax.Array:
    """Every replica's routed sums [R * T, D] -> this replica's [T, D]."""
    rows = routed.shape[0] // jax.lax.axis_size(DATA_AXIS)
    return jax.lax.dynamic_slice_in_dim(routed, jax.lax.axis_index(DATA_AXIS) * rows, rows)


# ------------------------------------------------------------------ all-to-all dispatch
#
# Under the expert split the all-reduce path has every device route all T * k pairs and
# reduce the whole [T, D]. The dispatch path shards the tokens instead: device d takes its
# T/n tokens (the activations are replicated, so that is a slice), sends each token's row
# once to every device holding one of its chosen experts (its expert ids and weights with
# it, the other devices' experts masked to -1), runs its GMM on what it received, sends
# each row's weighted partial sum back, adds a token's returns and all-gathers the [T/n, D]
# results. Shapes are static: each device sends each other device `capacity` rows (slots
# past a destination's rows point at a zero row with no experts). A step where some
# device would send more rows to one device than that (routing skewed past the capacity)
# takes the all-reduce path instead, all devices together (the overflow is max-reduced
# first): never a dropped token.
#
# Bytes each device moves, D-wide rows, n devices, T tokens, C the capacity:
#   all-reduce: 2 (n - 1) / n * T (a ring's reduce-scatter and all-gather)
#   all-to-all: (n - 1) * (2 C + T / n) (rows there and back, then the all-gather)
# so dispatch pays where C < T / (2 n). C is T/n times the share of tokens that need a
# given device under uniform routing, 1 - C(E - E/n, k) / C(E, k) (k distinct experts of
# E), times DISPATCH_CAPACITY_FACTOR for skew: dispatch is chosen for few experts per
# token over many devices (k = 2 of 64 experts over 8 devices: 0.23 of the tokens per
# device), never for k = 8 over 8 devices (0.66). XLA_INFERENCE_MOE_DISPATCH forces
# either. The local work shrinks the same way: a device routes n * C rows, not T * k pairs.
# LoRA experts dispatch too: each row's adapter column masks (lora/slots.LoraExperts, by
# token) travel with it (L*r bools a row), and the receiving device's grouped adapter
# products read them by the rows it received. Not dispatched: splits of the intermediate
# width (every device holds every expert: nothing to route).

DISPATCH_CAPACITY_FACTOR = 1.25


def _dispatch_capacity(w: Experts, num_tokens: int, k: int, devices: int,
                       split: str | None, replicas: int = 1) -> int | None:
    """Rows each device sends each device under all-to-all dispatch; None: all-reduce.
    replicas: w is one replica's cut of the experts (split across replicas)."""
    choice = envs.moe_dispatch()
    if choice == "all-reduce" or split != "experts":
        return None
    local_tokens = -(-num_tokens // devices)
    experts = w.count * replicas
    elsewhere = experts - experts // devices
    missed = math.prod((elsewhere - i) / (experts - i) for i in range(k)) if k <= elsewhere else 0
    capacity = min(local_tokens,
                   max(1, math.ceil(DISPATCH_CAPACITY_FACTOR * (1 - missed) * local_tokens)))
    if choice == "all-to-all" or 2 * capacity < local_tokens:
        return capacity
    return None


def _dispatched_experts(shares: Experts, x: jax.Array, weights: jax.Array, experts: jax.Array,
                        cfg: MoeConfig, devices: int, capacity: int, axes=TENSOR_AXIS
                        ) -> jax.Array:
    """Inside the shard_map over the tensor axis, x [T, D] replicated over `axes` (of
    `devices` devices): the routed sum [T, D] by all-to-all dispatch (the comment above),
    or by the all-reduce path on overflow."""
    first = jax.lax.axis_index(axes) * shares.count
    T = x.shape[0]
    local_tokens = -(-T // devices)
    pad = local_tokens * devices - T
    masks = _adapter_masks(shares)  # LoRA experts' column masks, by token: they travel too
    padded = (jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(weights, ((0, pad), (0, 0))),
              jnp.pad(experts, ((0, pad), (0, 0)), constant_values=-1),
              *(jnp.pad(m, ((0, pad), (0, 0))) for m in masks))
    mine = [jax.lax.dynamic_slice_in_dim(a, jax.lax.axis_index(axes) * local_tokens,
                                         local_tokens) for a in padded]
    token_at, overflow = _dispatch_slots(mine[2] // shares.count, devices, capacity)

    def dispatched():
        sent = _rows_to_send(*mine[:3], token_at, shares.count)  # [n, C, ...] each
        sent += [_with_empty_row(m, False)[token_at] for m in mine[3:]]
        received = [jax.lax.all_to_all(a, axes, 0, 0, tiled=True) for a in sent]
        rows = [a.reshape(devices * capacity, *a.shape[2:]) for a in received]
        # The received rows are this device's tokens now: the adapters' masks by them.
        here = _with_adapter_masks(shares, rows[3:])
        partial = _routed_experts(here, *rows[:3], cfg, first)  # [n * C, D]
        back = jax.lax.all_to_all(partial.reshape(devices, capacity, -1), axes, 0, 0,
                                  tiled=True)  # back[j, c]: token token_at[j, c]'s share on j
        summed = jnp.zeros((local_tokens + 1, back.shape[-1]), back.dtype).at[token_at].add(back)
        return jax.lax.all_gather(summed[:local_tokens], axes, tiled=True)[:T]

    def reduced():
        return jax.lax.psum(_routed_experts(shares, x, weights, experts, cfg, first), axes)

    return jax.lax.cond(jax.lax.pmax(overflow, axes), reduced, dispatched)


def _dispatch_slots(owners: jax.Array, devices: int, capacity: int
                    ) -> tuple[jax.Array, jax.Array]:
    """owners [Tl, k] (the device of each chosen expert, -1 for padding) -> (token_at [n, C]:
    the local token in each slot of the rows for each device, Tl for an empty slot;
    whether some device needs more than C rows, int32)."""
    local_tokens = owners.shape[0]
    needs = (owners[:, :, None] == jnp.arange(devices)).any(axis=1)  # [Tl, n]
    slot = jnp.cumsum(needs, axis=0) - 1  # the token's row among those sent to that device
    sent = needs & (slot < capacity)
    row = jnp.where(sent, slot, capacity)  # capacity: out of bounds, dropped
    token_at = jnp.full((devices, capacity), local_tokens, jnp.int32).at[
        jnp.arange(devices)[None, :], row].set(jnp.arange(local_tokens)[:, None], mode="drop")
    return token_at, jnp.any(needs & ~sent).astype(jnp.int32)


def _with_empty_row(a: jax.Array, value) -> jax.Array:
    """a [Tl, ...] and one more row of `value`: what an empty slot (token_at Tl) sends."""
    return jnp.concatenate([a, jnp.full((1, *a.shape[1:]), value, a.dtype)])


def _rows_to_send(x, weights, experts, token_at, experts_per_device) -> list:
    """Each slot's row, routing weights and expert ids (-1 where the expert is not the
    destination's), [n, C, D], [n, C, k], [n, C, k]; empty slots: zeros and -1."""
    x, weights, experts = (_with_empty_row(a, v)
                           for a, v in ((x, 0), (weights, 0), (experts, -1)))
    destination = jnp.arange(token_at.shape[0])[:, None, None]
    slot_experts = experts[token_at]
    there = (slot_experts >= 0) & (slot_experts // experts_per_device == destination)
    return [x[token_at], weights[token_at], jnp.where(there, slot_experts, -1)]


def _adapter_masks(w: Experts) -> list[jax.Array]:
    """The column masks [T, L*r] (by token) of w's LoRA experts, in order."""
    return [a.column_mask for a in w if isinstance(a, LoraExperts)]


def _with_adapter_masks(w: Experts, masks: list[jax.Array]) -> Experts:
    """w with its LoRA experts' column masks replaced, in order (_adapter_masks')."""
    masks = iter(masks)
    return Experts(*(dataclasses.replace(a, column_mask=next(masks))
                     if isinstance(a, LoraExperts) else a for a in w))


# The axis of each of gate, up and down (logical [E, in, out]) that a split cuts.
_SPLIT_AXES = {"experts": (0, 0, 0), "mlp": (2, 2, 1)}


def _expert_split(w: Experts, devices: int) -> str | None:
    """How the experts split over `devices` (the comment above): as param_shardings
    places them, experts first; None where no split's shares are all multipliable."""
    for split, axes in _SPLIT_AXES.items():
        if all(local_share(_base(a), split, axis, devices) is not None
               for a, axis in zip(w, axes)):
            return split
    return None


def _base(w):
    """The experts' own weights (a LoRA experts' base: its stacks split along with it)."""
    return w.base if isinstance(w, LoraExperts) else w


def _cut(axis: int | None) -> PartitionSpec:
    """[E, x, y] cut on `axis` over the tensor-parallel axis (None: whole)."""
    cut = [None, None, None]
    if axis is not None:
        cut[axis] = TENSOR_AXIS
    return PartitionSpec(*cut)


# The axes of a LoRA experts' A [E, in, L*r] and B [E, L*r, out] cut with its base's axis.
_ADAPTER_AXES = {0: (0, 0), 1: (1, None), 2: (None, 2)}


def _share_spec(w, local, split: str | None, axis: int):
    """The PartitionSpec tree of w's arrays for its share `local` (whole where None)."""
    if isinstance(w, LoraExperts):
        a_axis, b_axis = (None, None) if split is None else _ADAPTER_AXES[axis]
        return LoraExperts(_share_spec(w.base, local, split, axis), _cut(a_axis), _cut(b_axis),
                           PartitionSpec(), PartitionSpec())
    values = _cut(None if split is None else axis)
    if not isinstance(w, PackedExperts):
        return values
    groups = values if split is not None and share_splits_groups(w, local) else PartitionSpec()
    return dataclasses.replace(w, values=values, scales=groups,
                               offsets=None if w.offsets is None else groups)


def _with_static(share, local):
    """A device's share with its own static sizes (a PackedExperts' in / out features and
    group size are static fields, the whole experts' outside the shard_map)."""
    if isinstance(share, LoraExperts):
        return dataclasses.replace(share, base=_with_static(share.base, _base(local)))
    if not isinstance(share, PackedExperts):
        return share
    return dataclasses.replace(share, in_features=local.in_features,
                               out_features=local.out_features, group_size=local.group_size)


def _rows_of_adapters(w: Experts, row_tokens: jax.Array) -> Experts:
    """w with its LoRA experts' (lora/slots.LoraExperts) column masks, given by token, taken
    for each sorted (token, expert) row."""
    def rows(a):
        if not isinstance(a, LoraExperts):
            return a
        return dataclasses.replace(a, column_mask=a.column_mask[row_tokens])

    return Experts(*(rows(a) for a in w))


def moe_mlp_dense(p: MoeMlp, x: jax.Array, cfg: MoeConfig) -> jax.Array:
    """The reference: every expert on every token, combined with the routing weights
    (zero for the experts a token did not choose)."""
    weights, experts = route(p, x, cfg)
    combine = (jax.nn.one_hot(experts, cfg.num_experts) * weights[..., None]).sum(axis=1)  # [T, E]
    combine = combine.astype(x.dtype)
    xe = jnp.broadcast_to(x[:, None, :], (x.shape[0], cfg.num_experts, x.shape[1]))  # [T, E, D]
    if cfg.weight_inputs:  # every expert sees the token scaled by its weight (0: not chosen)
        xe, combine = xe * combine[..., None], (combine != 0).astype(x.dtype)
    w_gate, w_up, w_down = (expert_weights(w, x.dtype) for w in (p.w_gate, p.w_up, p.w_down))
    gate = jnp.einsum("TED,EDF->TEF", xe, w_gate)
    up = jnp.einsum("TED,EDF->TEF", xe, w_up)
    out = jnp.einsum("TEF,EFD->TED", jax.nn.silu(gate) * up, w_down)
    return _with_shared_expert(p, x, jnp.einsum("TED,TE->TD", out, combine))
