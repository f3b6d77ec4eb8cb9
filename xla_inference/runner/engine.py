"""The device-side engine: parameters, the paged KV cache and the compiled step programs."""

import concurrent.futures
import dataclasses
import functools
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xla_inference import envs
from xla_inference.kernels import cpu_quantized
from xla_inference.kernels.metadata import KvCache
from xla_inference.lora.slots import LM_HEAD, LoraSlots, attach, attach_lm_head, weight_sharding
from xla_inference.models.interface import KvLayer, ModelFamily, StepBatch
from xla_inference.parallel.pipeline import num_stages, stage_kv_sharding, stage_params
from xla_inference.parallel.sharding import (build_mesh, kv_cache_sharding, mark_tensor_splits,
                                             param_shardings, place, place_params,
                                             replica_local_specs, replica_sharding, replicated,
                                             traced_over)
from xla_inference.quantization import weight_table
from xla_inference.runner import compile_counter, huge_pages, jax_setup
from xla_inference.runner.buckets import pick_bucket, seqs_for_tokens, token_buckets
from xla_inference.runner.multimodal import EncoderCache, multimodal_batch
from xla_inference.runner.pooling import gather_pooled_rows
from xla_inference.runner.requests import BatchLayout, RequestState, build_step_batch
from xla_inference.runner.speculative import (draft_rows_logits, rejection_step, verify_inputs,
                                              verify_rows)
from xla_inference.runner.step_stats import StepStats
from xla_inference.sampling.draft_host import build_draft_batch, neutral_draft_extras
from xla_inference.sampling.host import build_sampling_batch, build_sampling_extras
from xla_inference.sampling.sampler import gather_logprobs, row_argmax, sample
from xla_inference.sampling.types import (SampleOutput, SamplingBatch, SamplingExtras,
                                          greedy_sampling_batch, neutral_sampling_extras)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    num_blocks: int  # KV pages, the null page 0 included
    block_size: int
    max_num_tokens: int  # per step (vLLM's max_num_batched_tokens)
    max_num_seqs: int
    max_model_len: int
    seed: int = 0
    max_logprobs: int = 20  # top logprobs computed per token when a request asks for any
    # Also compile the sampler and scorer that return every token's logprob, sorted, for
    # requests that ask for more than max_logprobs (vLLM's logprobs=-1, --max-logprobs -1).
    whole_vocab_logprobs: bool = False
    prompt_logprobs_chunk: int = 64  # prompt positions scored per call
    # KV cache groups (kernels/metadata.py), from vLLM's KV cache config: per layer, the
    # group whose block table it reads, and the set of cache arrays it uses (layers of
    # different groups that vLLM places on the same memory share one). None: one group,
    # one set of arrays per layer; () with no KV cache layers (encoder-only models): none.
    layer_groups: tuple[int, ...] | None = None
    layer_arrays: tuple[int, ...] | None = None
    # Speculative decoding's drafts per request (vLLM's num_speculative_tokens): warm-up
    # compiles the verify program for every bucket. 0: none.
    num_speculative_tokens: int = 0

    @property
    def max_blocks_per_seq(self) -> int:
        return math.ceil(self.max_model_len / self.block_size)

    @property
    def num_groups(self) -> int:
        return 1 if self.layer_groups is None else 1 + max(self.layer_groups, default=-1)

    def kv_layout(self, num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(group, array set) of each layer."""
        groups = self.layer_groups or (0,) * num_layers
        arrays = self.layer_arrays or tuple(range(num_layers))
        if len(groups) != num_layers or len(arrays) != num_layers:
            raise ValueError(f"KV layout for {max(len(groups), len(arrays))} layers; the model "
                             f"has {num_layers}")
        return groups, arrays


def _kv_array_shapes(layers: list[KvLayer], layer_arrays: tuple[int, ...]) -> list[tuple]:
    """(arrays per set, kv heads, head size) of each set of cache arrays; the layers that
    share a set must agree on it."""
    shapes = {}
    for i, (layer, a) in enumerate(zip(layers, layer_arrays)):
        shape = (layer.num_arrays, layer.num_kv_heads, layer.head_size)
        if shapes.setdefault(a, shape) != shape:
            raise ValueError(f"layer {i} shares KV cache arrays {a} with a layer of another "
                             f"shape: {shape} against {shapes[a]}")
    if sorted(shapes) != list(range(len(shapes))):
        raise ValueError(f"KV cache array sets must be numbered 0.., got {sorted(shapes)}")
    return [shapes[a] for a in range(len(shapes))]


@dataclasses.dataclass
class StepOutput:
    """A dispatched forward step: device arrays, not yet waited on."""

    logits: jax.Array  # [B, V] float32, at each request's sampled token
    hidden: jax.Array  # [T, D], every token's final hidden state (for prompt logprobs)
    # [B] int32: the tokens the step's own program drew (forward with sample=True, where
    # it could: _forward_argmax); None: sample the logits (sample, sample_on_device).
    tokens: jax.Array | None = None


def _forward_logits(model: ModelFamily, cfg, params, kv_cache, batch: StepBatch):
    kv_cache, hidden = model.forward(params, kv_cache, batch, cfg)
    return kv_cache, model.compute_logits(params, hidden[batch.logits_indices], cfg), hidden


def _forward_argmax(model: ModelFamily, cfg, params, kv_cache, batch: StepBatch,
                    argmax: jax.Array):
    """_forward_logits and, where argmax ([] bool), each row's argmax token: the token the
    sampler takes for a greedy row (the same row_argmax). A greedy step whose tokens stay on
    device then makes one program call, not two: the second call's dispatch was host time
    that, on two cores, comes off the spare core's (benchmarks/RESULTS.md, 2026-12-05 third
    session). Greedy only: the random draw's [B, V] temporaries in this program cost more
    than the call they would save."""
    kv_cache, logits, hidden = _forward_logits(model, cfg, params, kv_cache, batch)
    tokens = jax.lax.cond(argmax, lambda: row_argmax(logits),
                          lambda: jnp.zeros(logits.shape[0], jnp.int32))
    return kv_cache, logits, hidden, tokens


def _step_inputs(forward, batch_shardings: tuple, whole) -> tuple:
    """A step program's in_shardings after (parameters, kv cache): the batch's, and
    _forward_argmax's flag."""
    return batch_shardings + (whole,) * (forward is _forward_argmax)


def _step_outputs(forward, kv_shardings, whole) -> tuple:
    """A step program's out_shardings: (kv cache, logits, hidden), and _forward_argmax's
    tokens."""
    return (kv_shardings, whole, whole) + (whole,) * (forward is _forward_argmax)


def _argmax_arg(program, argmax: bool = False) -> tuple:
    """The last argument of a step program that draws argmax tokens (Programs.takes_argmax):
    whether it does this step; nothing for another program."""
    return (np.asarray(argmax),) if program.takes_argmax else ()


def _forward_greedy(model: ModelFamily, cfg, params, kv_cache, batch: StepBatch):
    """A draft model's step (speculative decoding): each row's argmax token [B] int32 in
    place of its logits; drafts are proposed greedily, so nothing else leaves the device."""
    kv_cache, logits, hidden = _forward_logits(model, cfg, params, kv_cache, batch)
    return kv_cache, row_argmax(logits), hidden


def _forward_lora(model: ModelFamily, cfg, params_lora, kv_cache, batch: StepBatch, *,
                  max_rank: int):
    """_forward_logits with the adapters: params_lora is (params, the LoRA stacks, each
    token's slot [T]); the targeted projections add their adapter's delta (lora/slots.py)."""
    params, stacks, token_slots = params_lora
    kv_cache, hidden = model.forward(_attach(model, cfg, params, stacks, token_slots, max_rank),
                                     kv_cache, batch, cfg)
    head = attach_lm_head(params, stacks, token_slots[batch.logits_indices], max_rank)
    return kv_cache, model.compute_logits(head, hidden[batch.logits_indices], cfg), hidden


def _attach(model: ModelFamily, cfg, params, stacks, token_slots, max_rank: int):
    """params with the adapters' stacks and each token's slot, as the family's forward reads
    them: a decoder's LoraWeights (lora/slots.py), or the family's own (models/interface)."""
    if model.lora is None:
        return attach(params, stacks, token_slots, max_rank)
    return model.lora.attach(params, stacks, token_slots, max_rank, cfg)


def _forward_pooled(model: ModelFamily, cfg, params, kv_cache, batch: StepBatch):
    """A pooling model's step: no LM head; each row's pooled rows (runner/pooling.py)
    gathered on device, and the hidden states (read back only for ALL pooling)."""
    kv_cache, hidden = model.forward(params, kv_cache, batch, cfg)
    pooled = gather_pooled_rows(hidden, batch.attention.seq_ids, batch.logits_indices,
                                batch.num_seqs)
    return kv_cache, pooled, hidden


def _forward_replicas(model: ModelFamily, cfg, params, kv_cache, batch: StepBatch, row_order,
                      token_order, *, mesh: Mesh, max_rank: int | None = None,
                      params_spec=PartitionSpec(), stacks_spec=PartitionSpec()):
    """Data parallel: every array of `batch` and of the cache has a leading replica axis, one
    replica per slice of the mesh's data axis. Each slice runs its own replica's forward on
    its own batch and cache (shard_map, manual over the data axis only: GSPMD still splits
    the model axis inside), with no traffic between replicas and its own loop trip counts.
    Logits and hidden states come back in the scheduler's order: row_order [R*B] and
    token_order [R*T] index the flattened (replica, row) and (replica, token) positions.

    With pipeline stages too, each replica's batch is its M micro-batches ([R, M, ...]):
    the replica's forward runs them over the stages (parallel/pipeline.run_microbatched,
    manual over the stage axis inside this map over the data axis), on its own slice of
    every stage's cache, and the row and token orders index (replica, micro-batch, row).

    With LoRA (max_rank given) params is (params, the LoRA stacks, each token's slot [R, T],
    or [R, M, T] with pipeline stages): every replica reads the same stacks (one set of
    slots for all replicas' adapters) and its own tokens' slots. stacks_spec: the stacks'
    cut over the data axis (an MoE model's expert stacks split as their experts are).

    params_spec: the params' cut over the data axis (parallel/sharding.replica_local_specs):
    an MoE model's experts split across the replicas enter as each replica's cut (the
    layers see it by its shape: layers/moe.py); everything else whole."""
    local = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731 (this slice's replica)

    def replica(params, kv_cache, batch):
        if max_rank is not None:
            base, stacks, token_slots = params
            params = _attach(model, cfg, base, stacks, local(token_slots), max_rank)
        kv_cache, hidden = model.forward(params, local(kv_cache), local(batch), cfg)
        return jax.tree.map(lambda a: a[None], kv_cache), hidden[None]

    data = PartitionSpec("data")
    if max_rank is not None:
        params_spec = (params_spec, stacks_spec, data)
    kv_cache, hidden = jax.shard_map(
        replica, mesh=mesh, in_specs=(params_spec, data, data), out_specs=(data, data),
        axis_names={"data"}, check_vma=False)(params, kv_cache, batch)
    base = params if max_rank is None else params[0]
    return (kv_cache, *_in_scheduler_order(model, cfg, base, hidden, batch, row_order,
                                           token_order, lora=None if max_rank is None else
                                           (params[1], params[2], max_rank)))


def _forward_replicas_greedy(model: ModelFamily, cfg, params, kv_cache, batch: StepBatch,
                             row_order, token_order, *, mesh: Mesh,
                             params_spec=PartitionSpec()):
    """A draft model's step over data parallel replicas: _forward_replicas, each row's argmax
    token in place of its logits (as _forward_greedy)."""
    kv_cache, logits, hidden = _forward_replicas(model, cfg, params, kv_cache, batch, row_order,
                                                 token_order, mesh=mesh, params_spec=params_spec)
    return kv_cache, row_argmax(logits), hidden


def _forward_microbatches(model: ModelFamily, cfg, params, kv_cache, batch: StepBatch, row_order,
                          token_order):
    """Pipeline parallel: the step's requests in M micro-batches, every array of `batch`
    with a leading micro-batch axis, overlapped over the stages (parallel/pipeline.py);
    logits and hidden states in the scheduler's order, as _forward_replicas."""
    kv_cache, hidden = model.forward(params, kv_cache, batch, cfg)
    return (kv_cache, *_in_scheduler_order(model, cfg, params, hidden, batch, row_order,
                                           token_order))


def _forward_microbatches_lora(model: ModelFamily, cfg, params_lora, kv_cache, batch: StepBatch,
                               row_order, token_order, *, max_rank: int):
    """_forward_microbatches with the adapters: params_lora is (params, the LoRA stacks,
    each token's slot [M, T]); every stage's layers add their own layers' adapters for the
    micro-batch they run (lora/slots._attach_staged), the LM head each row's."""
    params, stacks, token_slots = params_lora
    kv_cache, hidden = model.forward(_attach(model, cfg, params, stacks, token_slots, max_rank),
                                     kv_cache, batch, cfg)
    return (kv_cache, *_in_scheduler_order(model, cfg, params, hidden, batch, row_order,
                                           token_order, lora=(stacks, token_slots, max_rank)))


def _in_scheduler_order(model: ModelFamily, cfg, params, hidden, batch: StepBatch, row_order,
                        token_order, lora=None):
    """hidden [G, T, D] of G stacked groups of requests ([R, M, T, D]: replicas' micro-batches,
    flattened in that order) -> (logits at each request's sampled token, every token's
    hidden state), rows and tokens in the scheduler's order. lora: (stacks, token slots
    [G, T], max_rank) for an LM head adapter's rows."""
    tokens, width = hidden.shape[-2:]
    hidden = hidden.reshape(-1, width)  # groups: replicas, micro-batches, or both (flattened)
    groups = hidden.shape[0] // tokens
    first = tokens * jnp.arange(groups, dtype=jnp.int32)[:, None]
    rows = (batch.logits_indices.reshape(groups, -1) + first).reshape(-1)[row_order]
    if lora is not None:
        stacks, token_slots, max_rank = lora
        params = attach_lm_head(params, stacks, token_slots.reshape(-1)[rows], max_rank)
    return model.compute_logits(params, hidden[rows], cfg), hidden[token_order]


def _sample_step(num_logprobs: int, logits, sampling: SamplingBatch, extras: SamplingExtras | None,
                 base_key, step: jax.Array) -> SampleOutput:
    return sample(logits, sampling, extras, jax.random.fold_in(base_key, step), num_logprobs)


def _score_tokens(model: ModelFamily, cfg, num_logprobs: int, params, hidden, token_ids):
    """hidden [C, D] and the token that followed each -> its logprob, rank and the top k."""
    return gather_logprobs(model.compute_logits(params, hidden, cfg), token_ids, num_logprobs)


def _with_head_adapters(max_rank: int, params_lora):
    """(params, the LoRA stacks, each logits row's slot [n]) -> params whose LM head adds
    each row's adapter's delta (none for slot 0, or an adapter without lm_head weights)."""
    params, stacks, row_slots = params_lora
    return attach_lm_head(params, stacks, row_slots, max_rank)


def _draft_rows_logits_lora(model: ModelFamily, cfg, max_rank: int, params_lora, hidden, rows):
    """draft_rows_logits with an LM head adapter per row: params_lora's row slots [len(rows)]."""
    return draft_rows_logits(model, cfg, _with_head_adapters(max_rank, params_lora), hidden, rows)


def _score_tokens_lora(model: ModelFamily, cfg, num_logprobs: int, max_rank: int, params_lora,
                       hidden, token_ids):
    """_score_tokens with an LM head adapter per row: params_lora's row slots [C]."""
    return _score_tokens(model, cfg, num_logprobs, _with_head_adapters(max_rank, params_lora),
                         hidden, token_ids)


class Programs:
    """One jitted function and its executables compiled ahead of time, by input shape.

    Start-up lowers each shape in turn (tracing is Python, one thread) and hands each
    compile to a thread pool as soon as it is lowered: XLA compiles, and loads from the
    persistent cache, outside the GIL (benchmarks/RESULTS.md has the start-up figures). A
    call whose shapes were not compiled ahead falls back to the jit, which compiles then
    (and shows in compile_counter).
    """

    def __init__(self, jitted, key, takes_argmax: bool = False):
        self.jitted, self.key, self.compiled = jitted, key, {}
        # A step program whose last argument says whether it draws argmax tokens
        # (_forward_argmax).
        self.takes_argmax = takes_argmax

    def submit(self, examples: list[tuple], pool) -> dict:
        """Lower each example's shapes (arrays or ShapeDtypeStructs) in turn and hand each
        compile to `pool` as soon as it is lowered; -> {key: future}."""
        futures = {}
        for args in examples:
            k = self.key(*args)
            if k not in self.compiled and k not in futures:
                futures[k] = pool.submit(_timed_compile, self.jitted.lower(*args))
        return futures

    def collect(self, futures: dict, on_done=None) -> None:
        """Keep the executables of submit's futures as each finishes; on_done(key, seconds
        its compile took, how many remain) after each."""
        keys = {future: k for k, future in futures.items()}
        for done, future in enumerate(concurrent.futures.as_completed(keys), start=1):
            self.compiled[keys[future]], seconds = future.result()
            if on_done is not None:
                on_done(keys[future], seconds, len(keys) - done)

    def __call__(self, *args):
        return self.compiled.get(self.key(*args), self.jitted)(*args)


def _with_param_leaves(tree, lora: bool, forward):
    """`forward` for a step program whose first argument holds the parameters as the flat
    tuple of their arrays (`tree` their structure): with LoRA (leaves, stacks, slots), else
    the leaves alone."""
    def step(first, *args):
        if lora:
            leaves, *rest = first
            return forward((tree.unflatten(leaves), *rest), *args)
        return forward(tree.unflatten(first), *args)
    return step


def _with_table_leaves(tree, forward):
    """`forward` for a step program whose first argument is (the parameter arrays not named
    by address, the weight table): the table handed to the weights that name its rows."""
    def step(first, *args):
        leaves, table = first
        return forward(weight_table.attach(tree.unflatten(leaves), table), *args)
    return step


def _first_rows(num_rows: int, logits):
    return logits[:num_rows]


def _feed_tokens(input_ids, tokens, at, rows):
    """A step's input ids with tokens the last step sampled, still on device, written at
    `at` (tokens[rows]); padding entries point past the end and are dropped."""
    return input_ids.at[at].set(tokens[rows], mode="drop")


def _timed_compile(lowered):
    t0 = time.perf_counter()
    return lowered.compile(), time.perf_counter() - t0


def _compile_threads() -> int:
    """Programs compiled at once: the cores this process may use, at most 8 (memory)."""
    return min(len(os.sched_getaffinity(0)), 8)


def _batch_key(params, kv_cache, batch: StepBatch, *orders):
    return batch.input_ids.shape[-1]


def _sample_key(logits, sampling, extras, base_key, step):
    return logits.shape[0], extras is None


def _draft_rows_key(params, hidden, rows):
    return hidden.shape[0], rows.shape[0]


def _rejection_key(logits, drafts, sampling, extras, base_key, step):
    return drafts.tokens.shape, extras is None


class ModelEngine:
    """Owns params and KV cache; runs one ragged step at a time on padded buckets.

    Data parallel (the mesh's data axis > 1): R replicas, each with its own share of the KV
    pages (vLLM's page ids r * pages_per_replica onwards, plugin/dp_scheduler.py) and its own
    rows of every step, run side by side in one program.

    params may mix dtypes: bfloat16 projection matrices with float32 activations and KV
    cache (kv_dtype) is dtype=bfloat16 on the host CPU (plugin/worker.py, layers/linear.py)."""

    def __init__(self, model: ModelFamily, model_cfg, params, engine_cfg: EngineConfig, kv_dtype,
                 mesh: Mesh | None = None, lora: LoraSlots | None = None,
                 pooling: bool = False, greedy_drafter: bool = False,
                 expert_parallel: bool = False):
        compile_counter.install()
        self.mesh = mesh if mesh is not None else build_mesh()
        self.model, self.model_cfg, self.cfg = model, model_cfg, engine_cfg
        # MoE under data parallel: the routed experts split over every device of the mesh,
        # by expert with --enable-expert-parallel, else by width (vLLM's split over DP x TP).
        across = None
        if self.mesh.shape["data"] > 1 and getattr(model_cfg, "moe", None) is not None:
            across = "experts" if expert_parallel else "mlp"
        self.param_shardings = param_shardings(params, model_cfg, self.mesh, across)
        # The LoRA stacks split as their base weights do over the model (and data) axes,
        # by global layer: under pipeline stages they stay whole over the stage axis.
        layer_shardings = self.param_shardings
        self.stages = num_stages(self.mesh)  # pipeline parallel stages (parallel/pipeline.py)
        # Pipeline parallel splits each step's requests into micro-batches, one per stage.
        self.microbatches = self.stages
        if self.stages > 1:
            _check_pipeline(model, model_cfg, engine_cfg, self.mesh, pooling)
            params, self.param_shardings = stage_params(params, self.param_shardings, self.mesh)
        params, self.param_shardings = mark_tensor_splits(params, self.param_shardings)
        self.params = place_params(params, self.param_shardings)
        huge_pages.collapse(self.params)  # fewer TLB misses per step (runner/huge_pages.py)
        # The step programs take the parameters as the flat tuple of their arrays, flattened
        # once here: a jit call walks its arguments' tree on every call, and a quantized
        # weight is a dataclass of three arrays and nine static fields (benchmarks/RESULTS.md,
        # issue 18's fifth session: the walk was 0.2-0.3 ms of a quantized step's ~3 ms).
        leaves, self._param_tree = jax.tree.flatten(self.params)
        self._param_leaves = tuple(leaves)
        leaf_shardings = tuple(self._param_tree.flatten_up_to(self.param_shardings))
        replicas = functools.partial(_forward_replicas, mesh=self.mesh,
                                     params_spec=replica_local_specs(self.param_shardings))
        self.token_buckets = token_buckets(engine_cfg.max_num_tokens)
        self.replicas = self.mesh.shape["data"]
        self.blocks_per_replica = engine_cfg.num_blocks // self.replicas
        self.rows_per_replica = np.zeros(self.replicas, np.int64)  # requests run, per replica
        self.kv_cache, kv_shardings = self._allocate_kv_cache(model.kv_layers(model_cfg), kv_dtype)
        whole = replicated(self.mesh)
        self.lora = lora
        first_shardings = leaf_shardings
        stacks_spec = PartitionSpec()
        if lora is not None:
            # Data parallel: one set of slots for every replica (build_engine gives it
            # max_loras per replica), each replica's tokens' slots on its own devices; an
            # MoE model's expert stacks split across the replicas as their experts are.
            leaf = weight_sharding if model.lora is None else model.lora.stack_sharding
            if self.stages > 1 and model.lora is None:  # as the stages hold their layers
                lora.stage(self.stages, len(params.layers.local))
            stacks = lora.place(lambda module: leaf(layer_shardings, module))
            stacks_spec = replica_local_specs(stacks)
            first_shardings = (leaf_shardings, stacks,
                               whole if self.replicas == 1 else replica_sharding(self.mesh))
        # The cache keeps its sharding from step to step (a change would recompile).
        # A pooling engine (vLLM's pooling runner) runs _forward_pooled in place of the
        # logits step; its StepOutput.logits holds the pooled rows.
        self.pooling = pooling
        if pooling and self.replicas > 1:
            raise ValueError("xla-inference serves pooling models without data parallelism "
                             "(--data-parallel-size 1)")
        if pooling and lora is not None:
            raise ValueError("xla-inference serves LoRA adapters on generative models only "
                             "(not with a pooling model yet)")
        if lora is not None and self.replicas > 1:  # with pipeline stages too
            forward = functools.partial(replicas, max_rank=lora.max_rank, stacks_spec=stacks_spec)
            batch_shardings = (replica_sharding(self.mesh), whole, whole)
        elif lora is not None and self.microbatches > 1:
            forward = functools.partial(_forward_microbatches_lora, max_rank=lora.max_rank)
            batch_shardings = (whole, whole, whole)
        elif lora is not None:
            forward = functools.partial(_forward_lora, max_rank=lora.max_rank)
            batch_shardings = (whole,)
        elif self.microbatches > 1 and self.replicas == 1:
            forward, batch_shardings = _forward_microbatches, (whole, whole, whole)
        elif self.replicas == 1:
            forward = _forward_pooled if pooling else _forward_logits
            if greedy_drafter:
                forward = _forward_greedy
            batch_shardings = (whole,)
            if forward is _forward_logits:  # a plain step may draw greedy tokens itself
                forward = _forward_argmax
        else:  # data parallel: a draft model's engine keeps each replica's draft KV too;
            # with pipeline stages, each replica runs its micro-batches
            forward = replicas if not greedy_drafter else functools.partial(
                _forward_replicas_greedy, mesh=self.mesh,
                params_spec=replica_local_specs(self.param_shardings))
            batch_shardings = (replica_sharding(self.mesh), whole, whole)

        # Traced over the mesh: layers partition by hand what GSPMD cannot (attention by KV
        # heads, collective matmuls; parallel/sharding.tensor_parallel_mesh).
        step = _with_param_leaves(self._param_tree, lora is not None,
                                  functools.partial(forward, model, model_cfg))
        self._forward = Programs(
            jax.jit(traced_over(self.mesh, step),
                    in_shardings=(first_shardings, kv_shardings,
                                  *_step_inputs(forward, batch_shardings, whole)),
                    out_shardings=_step_outputs(forward, kv_shardings, whole), donate_argnums=(1,)),
            _batch_key, takes_argmax=forward is _forward_argmax)
        # A LoRA engine's steps whose tokens all run without an adapter take the base
        # model's program, a plain engine's (the host knows it when it builds the step): no
        # delta to pay.
        base_forward = (replicas if self.replicas > 1
                        else _forward_microbatches if self.microbatches > 1 else _forward_argmax)
        self._forward_base = None if lora is None else Programs(
            jax.jit(traced_over(self.mesh, _with_param_leaves(
                        self._param_tree, False, functools.partial(base_forward, model, model_cfg))),
                    in_shardings=(leaf_shardings, kv_shardings,
                                  *_step_inputs(base_forward, batch_shardings, whole)),
                    out_shardings=_step_outputs(base_forward, kv_shardings, whole),
                    donate_argnums=(1,)),
            _batch_key, takes_argmax=base_forward is _forward_argmax)
        # Steps of a few tokens on the host CPU: quantized weights by address (runner's
        # _weight_table_program); None where not taken.
        self._forward_table, self._table_params, self._weight_table = None, None, None
        if (lora is None and not pooling and self.replicas == 1 and self.microbatches == 1
                and self.mesh.size == 1 and jax.default_backend() == "cpu"
                and envs.weight_table_enabled() and cpu_quantized.available()):
            self._weight_table_program(forward, leaf_shardings, kv_shardings, batch_shardings)
        widths = [engine_cfg.max_logprobs]
        if engine_cfg.whole_vocab_logprobs:
            widths.append(model_cfg.vocab_size)
        # By top-logprob width: the usual top max_logprobs, and the whole vocabulary if asked.
        self._samplers = {k: Programs(jax.jit(functools.partial(_sample_step, k)), _sample_key)
                          for k in widths}
        # With LoRA stacks for lm_head, the logits outside the forward (verify's draft rows,
        # prompt logprobs) take each row's slot and add its adapter's head delta: one
        # program for every mix, compiled at warm-up as the base one would be.
        self.head_lora = lora is not None and LM_HEAD in lora.stacks["vocab"]
        def scorer(k):
            if self.head_lora:
                return functools.partial(_score_tokens_lora, model, model_cfg, k, lora.max_rank)
            return functools.partial(_score_tokens, model, model_cfg, k)

        self._scorers = {k: jax.jit(scorer(k)) for k in widths}
        # A draft model's engine (spec_decode/draft_model.py, greedy_drafter): its StepOutput.logits
        # holds each row's argmax token; it never samples or scores, so warm-up skips those.
        self.greedy_drafter = greedy_drafter
        if greedy_drafter:
            if pooling or lora is not None or self.microbatches > 1:
                raise ValueError("a draft model's engine runs without pooling, LoRA adapters "
                                 "or pipeline stages")
            self._samplers, self._scorers = {}, {}
        self._base_key = jax.random.key(engine_cfg.seed)
        self._num_steps = 0
        # Speculative decoding's verify programs, compiled at warm-up for every bucket: the
        # logits of each request's K + 1 rows (by token bucket), then rejection sampling (by
        # row count, with or without the per-row extras).
        rows_logits = (functools.partial(_draft_rows_logits_lora, model, model_cfg, lora.max_rank)
                       if self.head_lora else functools.partial(draft_rows_logits, model, model_cfg))
        self._draft_rows_logits = Programs(jax.jit(rows_logits, out_shardings=whole),
                                           _draft_rows_key)
        self._rejection = Programs(jax.jit(rejection_step), _rejection_key)
        # A multimodal family's encoder outputs, by item identifier (runner/multimodal.py).
        self.encoder_cache = EncoderCache()
        # Per token bucket, the all-zero encoder rows and mask that steps with no multimodal
        # token pass, placed once (multimodal families only: _blank_embeds).
        self._blank_embeds_by_bucket: dict[int, tuple[jax.Array, jax.Array]] = {}
        if model.multimodal is not None and self.replicas > 1:
            raise ValueError("xla-inference serves multimodal models without data parallelism "
                             "(--data-parallel-size 1)")
        self.stats = StepStats()  # host/device time split (XLA_INFERENCE_STEP_STATS=1)
        # Async scheduling's overlap (plugin/async_output.py): a step may take the tokens the
        # last one sampled without their trip to the host; set before warm_up, which then
        # compiles the program that writes them into the input ids (a bucket and a row
        # count each).
        self.feeds_tokens = False
        self._feed = jax.jit(_feed_tokens, out_shardings=whole)

    def _weight_table_program(self, forward, leaf_shardings, kv_shardings, batch_shardings):
        """The forward program for steps of at most weight_table.max_rows() tokens whose
        quantized weights are named by address (quantization/weight_table.py): its first
        argument is (the other parameter arrays, the table), not every array."""
        detached = weight_table.detach(self.params)
        if detached is None:
            return
        leaves, tree = jax.tree.flatten(detached.params)
        sharding_of = {id(a): sh for a, sh in zip(self._param_leaves, leaf_shardings)}
        whole = replicated(self.mesh)
        self._weight_table = detached  # keeps the arrays the table points at
        self._table_max_rows = weight_table.max_rows()
        self._table_params = (tuple(leaves), jax.device_put(detached.table, whole))
        step = _with_table_leaves(tree, functools.partial(forward, self.model, self.model_cfg))
        self._forward_table = Programs(
            jax.jit(traced_over(self.mesh, step),
                    in_shardings=((tuple(sharding_of[id(a)] for a in leaves), whole),
                                  kv_shardings, *_step_inputs(forward, batch_shardings, whole)),
                    out_shardings=_step_outputs(forward, kv_shardings, whole), donate_argnums=(1,)),
            _batch_key, takes_argmax=forward is _forward_argmax)

    @property
    def argmax_in_forward(self) -> bool:
        """Whether plain steps draw greedy tokens in their own program (_forward_argmax;
        forward's `sample`)."""
        return self._forward.takes_argmax

    def _by_address(self, T: int) -> bool:
        """Whether a step of T tokens runs the program with weights by address."""
        return self._forward_table is not None and T <= self._table_max_rows

    def _step_program(self, T: int, leaves):
        """The forward program of a step of T tokens and its first argument: the
        weights-by-address program and its table where it runs such steps (never with LoRA),
        else the program of every parameter array (`leaves`: _step_params')."""
        if self._by_address(T):
            return self._forward_table, self._table_params
        return self._forward, leaves

    def _allocate_kv_cache(self, layers: list[KvLayer], kv_dtype) -> tuple[KvCache, KvCache]:
        """The cache (every set of arrays holds all of this replica's pages) and its
        shardings, as KvCache trees of the same structure."""
        layer_groups, layer_arrays = self.cfg.kv_layout(len(layers))
        num_slots = self.blocks_per_replica * self.cfg.block_size
        if self.stages > 1:
            return self._allocate_staged_kv_cache(layers, layer_groups, kv_dtype, num_slots)
        arrays, shardings = [], []
        for num_arrays, num_kv_heads, head_size in _kv_array_shapes(layers, layer_arrays):
            shape = (num_slots, num_kv_heads, head_size)
            if self.replicas > 1:
                shape = (self.replicas, *shape)
            sharding = kv_cache_sharding(self.model_cfg, shape, self.mesh, self.replicas > 1)
            zeros = jax.jit(functools.partial(jnp.zeros, shape, kv_dtype), out_shardings=sharding)
            arrays.append(tuple(zeros() for _ in range(num_arrays)))
            shardings.append((sharding,) * num_arrays)
        return (KvCache(arrays, layer_arrays, layer_groups),
                KvCache(shardings, layer_arrays, layer_groups))

    def _allocate_staged_kv_cache(self, layers: list[KvLayer], layer_groups: tuple[int, ...],
                                  kv_dtype, num_slots: int) -> tuple[KvCache, KvCache]:
        """Pipeline parallel: local layer j's K and V of every stage side by side,
        [stages * num_slots, K, H], each stage's slots on its own devices; the KvCache
        names the local layers (every stage's are alike: _check_pipeline). With data
        parallel replicas, [R, stages * num_slots, K, H], each replica's on its data slice."""
        per_stage = len(layers) // self.stages
        arrays, shardings = [], []
        for layer in layers[:per_stage]:
            shape = (num_slots, layer.num_kv_heads, layer.head_size)
            sharding = stage_kv_sharding(kv_cache_sharding(self.model_cfg, shape, self.mesh))
            staged = (self.stages * num_slots, *shape[1:])
            if self.replicas > 1:  # [R, stages * slots, K, H]: each replica's own slots
                staged = (self.replicas, *staged)
                sharding = NamedSharding(self.mesh, PartitionSpec("data", *sharding.spec))
            zeros = jax.jit(functools.partial(jnp.zeros, staged, kv_dtype),
                            out_shardings=sharding)
            arrays.append(tuple(zeros() for _ in range(layer.num_arrays)))
            shardings.append((sharding,) * layer.num_arrays)
        local = tuple(range(per_stage)), (layer_groups[0],) * per_stage
        return KvCache(arrays, *local), KvCache(shardings, *local)

    def layout_for(self, num_tokens: int) -> BatchLayout:
        T = pick_bucket(self.token_buckets, num_tokens)
        return BatchLayout(T, seqs_for_tokens(T, self.cfg.max_num_seqs), self.cfg.max_blocks_per_seq,
                           self.cfg.block_size, self.cfg.num_groups)

    @property
    def vocab_size(self) -> int:
        return self.model_cfg.vocab_size

    @property
    def can_feed_tokens(self) -> bool:
        """Whether forward takes tokens sampled on device (`fed`): one group of text rows a
        step (no data parallel replicas, pipeline micro-batches, pooling or images)."""
        return (self.replicas == 1 and self.microbatches == 1 and not self.pooling
                and self.model.multimodal is None and not self.greedy_drafter)

    def forward(self, scheduled: list[tuple[RequestState, int]], fed=None,
                sample: bool = False) -> StepOutput:
        """Dispatch the model on the scheduled tokens (JAX runs it asynchronously).

        sample: the step's tokens will be sampled as sample_on_device samples them (no
        extras, no logprobs); where they are all greedy and the step's program can
        (_takes_argmax), it draws them itself: StepOutput.tokens.

        fed: (tokens [B'] on device, a row of it per scheduled request or -1): each such
        request's last token is the one at its row, not yet on the host (its token_ids hold
        a negative placeholder there); only where can_feed_tokens."""
        if self.lora is not None and self.replicas * self.microbatches > 1:
            if self.replicas > 1 and self.microbatches > 1:
                batch, row_order, token_order = self._replica_microbatch_batch(scheduled)
            elif self.replicas > 1:
                batch, row_order, token_order = self._replica_batch(scheduled)
            else:
                batch, row_order, token_order = self._microbatch_batch(scheduled)
            slots = self._replica_token_slots(scheduled, token_order, batch.input_ids.shape)
            return self._run_forward(batch, row_order, token_order, token_slots=slots)
        if self.replicas > 1 and self.microbatches > 1:
            return self._run_forward(*self._replica_microbatch_batch(scheduled))
        if self.replicas > 1:
            return self._run_forward(*self._replica_batch(scheduled))
        if self.microbatches > 1:
            return self._run_forward(*self._microbatch_batch(scheduled))
        num_tokens = sum(n for _, n in scheduled)
        batch = self._with_multimodal(build_step_batch(scheduled, self.layout_for(num_tokens)),
                                      scheduled)
        if fed is not None:
            batch = self._fed_batch(batch, scheduled, *fed)
        elif self.feeds_tokens and (batch.input_ids < 0).any():
            raise RuntimeError("a step's input holds a token placeholder it is not fed")
        sampled = [r for r, _ in scheduled] if sample else None
        if self.lora is None:
            return self._run_forward(batch, sampled=sampled)
        return self._run_forward(batch, token_slots=self._token_slots(scheduled, batch.num_tokens),
                                 sampled=sampled)

    def _fed_batch(self, batch: StepBatch, scheduled, tokens: jax.Array, rows) -> StepBatch:
        """The batch with each fed request's last token taken from `tokens` on device."""
        if not self.can_feed_tokens:
            raise ValueError("this engine's steps take their tokens from the host")
        T, S = batch.num_tokens, self.cfg.max_num_seqs
        at, src = np.full(S, T, np.int32), np.zeros(S, np.int32)
        start, k = 0, 0
        for (req, num_new), row in zip(scheduled, rows):
            if row >= 0:
                at[k], src[k] = start + len(req.token_ids) - 1 - req.num_computed_tokens, row
                k += 1
            start += num_new
        if int((batch.input_ids < 0).sum()) != k or not (at[:k] < start).all():
            raise RuntimeError("a step's input holds a token placeholder it is not fed")
        return dataclasses.replace(batch, input_ids=self._feed(batch.input_ids, tokens, at, src))

    def _with_multimodal(self, batch: StepBatch, scheduled) -> StepBatch:
        """A multimodal family's step batch (rope positions, encoder rows); others' as is."""
        mm = self.model.multimodal
        if mm is None:
            return batch
        embed = self.params.embed
        return multimodal_batch(batch, scheduled, self.encoder_cache, embed.shape[-1], embed.dtype,
                                lambda n, items: mm.rope_positions(self.model_cfg, n, items),
                                blank=self._blank_embeds)

    def _blank_embeds(self, T: int) -> tuple[jax.Array, jax.Array]:
        """Zeroed encoder rows [T, D] and mask [T] for a step with no multimodal token, on
        the devices as the step program takes its batch (replicated), built and placed once
        per bucket (at warm-up): every decode step and text-only prefill would otherwise
        build T x D zeros on the host and copy them over. They stay as they are: the program
        only reads them. Costs one [T, D] array per bucket of memory, the sum over the
        buckets about twice the largest."""
        if T not in self._blank_embeds_by_bucket:
            embed = self.params.embed
            whole = replicated(self.mesh)
            self._blank_embeds_by_bucket[T] = (
                place(np.zeros((T, embed.shape[-1]), embed.dtype), whole),
                place(np.zeros(T, bool), whole))
        return self._blank_embeds_by_bucket[T]

    def encode(self, req: RequestState, item_indices) -> None:
        """Run the encoder on the request's items at these indices (vLLM's
        scheduled_encoder_inputs) and keep each output until free_encoder_outputs; an
        item whose identifier is already cached is not encoded again."""
        for index in item_indices:
            item = req.mm_items[index]
            if item.identifier not in self.encoder_cache:
                if item.data is None:
                    raise RuntimeError(f"multimodal item {item.identifier} is scheduled for the "
                                       "encoder without its data")
                self.encoder_cache.put(item.identifier, self.model.multimodal.encode(
                    self.params, self.model_cfg, item))

    def free_encoder_outputs(self, identifiers) -> None:
        self.encoder_cache.free(identifiers)

    def _token_slots(self, scheduled: list[tuple[RequestState, int]], T: int) -> np.ndarray:
        """Each token's LoRA slot (0: the base model, and padding), loading the step's
        adapters into slots where they are not yet."""
        slots = self.lora.slots_for([req.lora_id for req, _ in scheduled])
        return np.repeat(np.asarray([slots[req.lora_id] for req, _ in scheduled] + [0], np.int32),
                         [n for _, n in scheduled] + [T - sum(n for _, n in scheduled)])

    def _replica_token_slots(self, scheduled: list[tuple[RequestState, int]],
                             token_order: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Data parallel or pipeline stages: each group's tokens' LoRA slots ([R, T], [M, T]
        or [R, M, T]; 0 for padding), put where _stacked_batch put each request's tokens
        (token_order, in the scheduler's order)."""
        slots = np.zeros(math.prod(shape), np.int32)
        per_token = self._token_slots(scheduled, sum(n for _, n in scheduled))
        slots[token_order[:len(per_token)]] = per_token
        return slots.reshape(shape)

    def _step_params(self, token_slots=None):
        """The forward program's first argument: the parameters' flat tuple of arrays, or with
        LoRA (that tuple, stacks, slots)."""
        if self.lora is None:
            return self._param_leaves
        if token_slots is None:
            raise ValueError("a LoRA engine's step needs each token's slot")
        return (self._param_leaves, self.lora.stacks, token_slots)

    def lower_step(self, batch: StepBatch, *orders, token_slots=None):
        """The step program that passes every parameter array, lowered for `batch` (and a
        multi-group step's orders) as the engine calls it: tests and benchmarks read its
        HLO."""
        return self._forward.jitted.lower(self._step_params(token_slots), self.kv_cache, batch,
                                          *orders, *_argmax_arg(self._forward))

    def _replica_batch(self, scheduled: list[tuple[RequestState, int]]):
        """Each replica's requests (known by their KV pages) as its own batch, all padded to
        one bucket and stacked; and where each request's row and tokens land."""
        owners = self._replica_owners(scheduled)
        batch, row_order, token_order = self._stacked_batch(scheduled, owners, self.replicas,
                                                            self.blocks_per_replica)
        return self._replicas_on_mesh(batch), row_order, token_order

    def _replica_owners(self, scheduled: list[tuple[RequestState, int]]) -> list[int]:
        owners = []
        for req, _ in scheduled:
            r = req.block_ids[0][0] // self.blocks_per_replica  # any page: null pages too
            owners.append(r)
            self.rows_per_replica[r] += 1
        return owners

    def _replica_microbatch_batch(self, scheduled: list[tuple[RequestState, int]]):
        """Pipeline stages with data parallel replicas: each replica's requests (by their
        pages) in M micro-batches of about equal tokens, every group (replica r,
        micro-batch m) padded to one bucket, stacked [R, M, ...]; the orders index the
        flattened (r, m) groups."""
        R, M = self.replicas, self.microbatches
        tokens = [[0] * M for _ in range(R)]
        owners = []
        for r, (_, num_new) in zip(self._replica_owners(scheduled), scheduled):
            m = tokens[r].index(min(tokens[r]))
            owners.append(r * M + m)
            tokens[r][m] += num_new
        first_pages = [(g // M) * self.blocks_per_replica for g in range(R * M)]
        batch, row_order, token_order = self._stacked_batch(scheduled, owners, R * M, 0,
                                                            first_pages)
        return self._replicas_on_mesh(_by_replica(batch, R)), row_order, token_order

    def _replicas_on_mesh(self, batch: StepBatch) -> StepBatch:
        """The replicas' stacked batch as it goes into the step. One process: the host
        arrays as they are (jit places them). Several (multi-host): jit takes host arrays
        only as wholly replicated inputs, so each process, which built the same batch from
        the driver's SchedulerOutput, places its own devices' replicas (the data axis)."""
        if jax.process_count() == 1:
            return batch
        sharding = replica_sharding(self.mesh)
        return jax.tree.map(lambda a: place(a, sharding), batch)

    def _microbatch_batch(self, scheduled: list[tuple[RequestState, int]]):
        """Pipeline parallel: the requests in self.microbatches groups of about equal tokens
        (each to the group with fewest so far), stacked as _replica_batch stacks replicas."""
        tokens = [0] * self.microbatches
        owners = []
        for _, num_new in scheduled:
            m = tokens.index(min(tokens))
            owners.append(m)
            tokens[m] += num_new
        return self._stacked_batch(scheduled, owners, self.microbatches, 0)

    def _stacked_batch(self, scheduled: list[tuple[RequestState, int]], owners: list[int],
                       num_groups: int, pages_per_group: int, first_pages: list[int] | None = None):
        """Each group's requests (owners: each request's group) as its own batch, all padded
        to one bucket and stacked; and where each request's row and tokens land. Group r's
        page ids start at r * pages_per_group (or first_pages[r])."""
        if first_pages is None:
            first_pages = [r * pages_per_group for r in range(num_groups)]
        groups = [[] for _ in range(num_groups)]
        tokens = [0] * num_groups  # each group's tokens so far
        places = []  # (group, row in it, first token in it)
        for (req, num_new), r in zip(scheduled, owners):
            places.append((r, len(groups[r]), tokens[r]))
            groups[r].append((req, num_new))
            tokens[r] += num_new
        layout = self.layout_for(max(tokens))
        T, B = layout.num_tokens, layout.num_seqs
        batches = [build_step_batch(group, layout, first_pages[r])
                   for r, group in enumerate(groups)]
        row_order = np.zeros(num_groups * B, np.int32)
        token_order = np.zeros(num_groups * T, np.int32)
        done = 0
        for i, ((_, num_new), (r, row, first)) in enumerate(zip(scheduled, places)):
            row_order[i] = r * B + row
            token_order[done:done + num_new] = np.arange(r * T + first, r * T + first + num_new)
            done += num_new
        return _stack(batches), row_order, token_order

    def _run_forward(self, batch: StepBatch, *orders, token_slots=None,
                     sampled: list[RequestState] | None = None) -> StepOutput:
        """Dispatch the step's program; `sampled`: the requests whose tokens it also
        samples, where it does (_takes_argmax)."""
        T = batch.input_ids.shape[-1]
        if self.lora is not None and not token_slots.any():  # no adapter in this step
            program, params = self._forward_base, self._param_leaves
        else:
            program, params = self._step_program(T, self._step_params(token_slots))
        argmax = program.takes_argmax and self._takes_argmax(batch, sampled)
        try:
            self.kv_cache, logits, hidden, *tokens = self.stats.run(
                program, params, self.kv_cache, batch, *orders, *_argmax_arg(program, argmax),
                bucket=T)
        except cpu_quantized.TableWeightMisuse as e:  # traced here where warm_up did not
            self._keep_weight_arrays(e)
            return self._run_forward(batch, *orders, token_slots=token_slots, sampled=sampled)
        if argmax:
            self._num_steps += 1  # the step number sample_on_device would have taken
        return StepOutput(logits, hidden, tokens[0] if argmax else None)

    def _takes_argmax(self, batch: StepBatch, requests: list[RequestState] | None) -> bool:
        """Whether the step's program draws its tokens (_forward_argmax): for `requests`
        all greedy, where its logits rows are those sample_on_device would sample
        (_sampled_rows; a one-request prefill's bucket has more, whose argmax would cost
        more than the second call saves)."""
        return (requests is not None and all(r.options.greedy for r in requests)
                and self._sampled_rows(len(requests)) == batch.num_seqs)

    def sample(self, logits: jax.Array, requests: list[RequestState],
               grammar_masks: dict[int, np.ndarray] | None = None) -> SampleOutput:
        """One token per row of `requests`, sampled on device; numpy arrays, one row each.

        grammar_masks: row -> bool [V] of the tokens a structured output allows."""
        B = logits.shape[0]
        sampling = build_sampling_batch([(r.options, r.num_output_tokens) for r in requests], B)
        extras = None
        # Copy token lists only for steps that build the [B, V] extras (not every decode step).
        if grammar_masks or any(r.options.needs_extras(r.num_output_tokens) for r in requests):
            extras = build_sampling_extras(
                [(r.options, r.token_ids[:r.num_prompt_tokens], r.output_ids) for r in requests],
                B, self.vocab_size, grammar_masks)
        width = self.logprobs_width(r.options.num_top_logprobs(self.vocab_size) for r in requests)
        out = self._run_sample(self._samplers[width], logits, sampling, extras)
        return jax.tree.map(lambda a: np.asarray(a)[:len(requests)], out)

    def sample_on_device(self, logits: jax.Array, requests: list[RequestState]) -> jax.Array:
        """sample() for a step whose requests need neither the [B, V] extras nor logprobs
        (the same program, so the same tokens): the tokens [B'], left on device, B' <= B
        rows (_rows_to_sample), the requests' first."""
        logits = self._rows_to_sample(logits, len(requests))
        sampling = build_sampling_batch([(r.options, r.num_output_tokens) for r in requests],
                                        logits.shape[0])
        program = self._samplers[self.logprobs_width(())]
        return self._run_sample(program, logits, sampling, None).tokens

    @functools.cached_property
    def _bucket_row_counts(self) -> list[int]:
        """Each token bucket's rows: the row counts the samplers and _feed_tokens are
        compiled for."""
        return sorted({self.layout_for(T).num_seqs for T in self.token_buckets})

    @functools.cached_property
    def _row_slices(self) -> dict:
        """Row count -> the program that takes that many first rows of a step's logits."""
        whole = replicated(self.mesh)
        return {n: jax.jit(functools.partial(_first_rows, n), out_shardings=whole)
                for n in self._bucket_row_counts}

    @functools.cached_property
    def _samples_first_rows(self) -> bool:
        """Whether a step's requests are its first logits rows (one group: no data parallel
        replicas or pipeline micro-batches), which _rows_to_sample then slices."""
        return self.replicas * self.microbatches == 1

    def _sampled_rows(self, num_requests: int) -> int:
        """The logits rows a step of `num_requests` samples (_rows_to_sample)."""
        return pick_bucket(self._bucket_row_counts, max(1, num_requests))

    def _rows_to_sample(self, logits: jax.Array, num_requests: int) -> jax.Array:
        """The logits' rows a step of `num_requests` samples: the first, as many as the fewest
        compiled row count that holds them, not its bucket's rows. Every bucket from
        max_num_seqs tokens up has max_num_seqs rows, so a one-request prefill sampled (with
        64) 63 rows of padding: 8-22 ms where one row takes 0.3-0.9 (RESULTS.md, 2026-12-05).
        A step of several groups (data parallel replicas, pipeline micro-batches) keeps all
        its rows (its requests' rows are not the first)."""
        if not self._samples_first_rows:
            return logits
        rows = self._sampled_rows(num_requests)
        return logits if rows >= logits.shape[0] else self._row_slices[rows](logits)

    def _warm_up_row_slices(self) -> None:
        """Compile _rows_to_sample's slices: every row count from every larger one."""
        whole = replicated(self.mesh)
        for B in self._bucket_row_counts:
            logits = jax.device_put(np.zeros((B, self.vocab_size), np.float32), whole)
            for rows in self._bucket_row_counts:
                if rows < B:
                    self._row_slices[rows](logits)

    def verify_drafts(self, hidden: jax.Array, scheduled: list[tuple[RequestState, int]],
                      drafts: list[list[int]], num_speculative_tokens: int,
                      grammar_masks: dict[tuple[int, int], np.ndarray] | None = None,
                      num_acceptable: list[int] | None = None):
        """Speculative decoding: each request's emitted tokens (accepted drafts, then a
        recovered or bonus token) from the step's hidden states. grammar_masks: (row,
        position) -> bool [V]. num_acceptable: per request, how many of its drafts may be
        accepted (the rest were computed but are not verified: the token at that position
        is drawn as a bonus). -> (tokens [n, K+1] with -1 after the emitted, counts [n])."""
        if self.microbatches > 1:
            raise NotImplementedError("speculative decoding with pipeline stages")
        K = num_speculative_tokens
        B = self._verify_slots(len(scheduled))
        requests = [r for r, _ in scheduled]
        rows = verify_rows([n for _, n in scheduled], [len(d) for d in drafts], B, K)
        if num_acceptable is not None:  # the rows stay where the step computed the drafts
            drafts = [d[:a] for d, a in zip(drafts, num_acceptable, strict=True)]
        batch, sampling, extras = verify_inputs(requests, drafts, B, K, self.vocab_size,
                                                grammar_masks)
        self._num_steps += 1
        row_slots = np.zeros(B * (K + 1), np.int32)  # each request's K + 1 rows: its adapter
        row_slots[:len(requests) * (K + 1)] = np.repeat(
            self._lora_slots([r.lora_id for r in requests]), K + 1)
        logits = self._draft_rows_logits(self._head_params(row_slots), hidden, rows)
        out = self.stats.run(self._rejection, logits, batch, sampling, extras, self._base_key,
                             np.uint32(self._num_steps))
        n = len(requests)
        return np.asarray(out.tokens)[:n], np.asarray(out.num_emitted)[:n]

    def _lora_slots(self, lora_ids) -> np.ndarray:
        """The device slot of each adapter id (0: none); all zeros on an engine whose LM
        head has no adapters (its logits programs take no slots)."""
        if not self.head_lora:
            return np.zeros(len(lora_ids), np.int32)
        lora_ids = [int(i) for i in lora_ids]
        slots = self.lora.slots_for(lora_ids)  # the step's adapters: already in their slots
        return np.asarray([slots[i] for i in lora_ids], np.int32)

    def _head_params(self, row_slots: np.ndarray):
        """The first argument of the logits programs outside the forward (verify, scoring):
        params, or with LM head adapters (params, stacks, each logits row's slot)."""
        return (self.params, self.lora.stacks, row_slots) if self.head_lora else self.params

    @functools.cached_property
    def _verify_slot_counts(self) -> list[int]:
        """The request slots verify programs are compiled for: each bucket's row count
        (derived once from the buckets, read by every verify step). Data parallel: a step
        carries up to every replica's rows of its bucket (the forward returns them all in the
        scheduler's order), so each count times the replicas too."""
        counts = set(self._bucket_row_counts)
        return sorted(counts | {n * self.replicas for n in counts})

    def _verify_rows_fit(self, T: int, num_slots: int) -> bool:
        """Whether a step of token bucket T can carry num_slots requests (every replica's)."""
        return num_slots <= self.layout_for(T).num_seqs * self.replicas

    def _verify_slots(self, num_requests: int) -> int:
        """Request slots of a verify step: the fewest compiled that hold its requests, not
        its token bucket's rows (a batch-1 step of 1 + K tokens pads to 16 rows; its K + 1
        logit rows per slot and the rejection over them would cost 16 times the needed)."""
        return pick_bucket(self._verify_slot_counts, num_requests)

    def _run_sample(self, program, logits, sampling: SamplingBatch, extras: SamplingExtras | None):
        self._num_steps += 1
        step = np.uint32(self._num_steps)
        return self.stats.run(program, logits, sampling, extras, self._base_key, step)

    def logprobs_width(self, wanted) -> int:
        """The compiled top-logprob width that covers every request's `wanted` (ints or None):
        max_logprobs, or the whole vocabulary."""
        most = max((n for n in wanted if n is not None), default=0)
        fits = [k for k in self._samplers if k >= most]
        if not fits:
            raise ValueError(f"{most} top logprobs asked for; this engine computes at most "
                             f"{self.cfg.max_logprobs} (vLLM's --max-logprobs -1 serves the whole "
                             "vocabulary)")
        return min(fits)

    def score_tokens(self, hidden: jax.Array, rows: np.ndarray, next_ids: np.ndarray,
                     width: int | None = None, lora_ids=None):
        """Logprobs of `next_ids` after the hidden states at `rows` of a step, with the top
        `width` alternatives (a compiled width, see logprobs_width; max_logprobs by default):
        numpy (ids [n, k+1], logprobs [n, k+1], ranks [n]). lora_ids: each row's request's
        adapter (None: the base model's), whose LM head scores it."""
        score = self._scorers[self.cfg.max_logprobs if width is None else width]
        chunk = self.cfg.prompt_logprobs_chunk
        hidden = np.asarray(hidden)
        row_slots = self._lora_slots(np.zeros(len(rows), np.int32) if lora_ids is None
                                     else np.asarray(lora_ids))
        parts = []
        for start in range(0, len(rows), chunk):
            n = min(chunk, len(rows) - start)
            h = np.zeros((chunk, hidden.shape[1]), hidden.dtype)
            ids, slots = np.zeros(chunk, np.int32), np.zeros(chunk, np.int32)
            h[:n], ids[:n] = hidden[rows[start:start + n]], next_ids[start:start + n]
            slots[:n] = row_slots[start:start + n]
            out = score(self._head_params(slots), h, ids)
            parts.append([np.asarray(a)[:n] for a in out])
        return tuple(np.concatenate(p) for p in zip(*parts))

    def warm_up(self, encoder_grids=(), raw_pixels: bool = False) -> float:
        """Compile every bucket's programs (forward, sampler with and without the [B, V]
        extras, the scorer), so serving never compiles; and a multimodal family's encoder
        for each of `encoder_grids` (image grids, (t, h, w) in patches), for the pixels the
        processor delivers: raw uint8 ones with raw_pixels (vLLM's mm_device_do_normalize),
        else normalized float32 ones. Only that dtype: the tower's programs are per dtype,
        and compiling both would double its start-up compile for pixels that never come."""
        start = time.perf_counter()
        compile_counter.mark_warm(done=False)
        forward_args, sample_args = [], []
        for T in self.token_buckets:
            layout = self.layout_for(T)
            B = layout.num_seqs
            batch = self._with_multimodal(build_step_batch([], layout), [])
            groups = self.replicas * self.microbatches  # stacked groups of requests per step
            if groups == 1:
                forward_args.append((self._step_params(np.zeros(T, np.int32)), self.kv_cache,
                                     batch, *_argmax_arg(self._forward)))
            else:
                stacked = _stack([batch] * groups)
                if self.replicas > 1 and self.microbatches > 1:
                    stacked = _by_replica(stacked, self.replicas)
                slots = np.zeros(stacked.input_ids.shape, np.int32)  # [groups or R, M, T]
                if self.replicas > 1:
                    stacked = self._replicas_on_mesh(stacked)
                forward_args.append((self._step_params(slots), self.kv_cache, stacked,
                                     np.zeros(groups * B, np.int32),
                                     np.zeros(groups * T, np.int32)))
                B *= groups  # the sampler sees every group's rows
            if self.pooling:
                continue  # a pooling engine never samples nor scores (nor has an LM head)
            logits = jax.ShapeDtypeStruct((B, self.vocab_size), jnp.float32,
                                          sharding=replicated(self.mesh))  # as the forward's
            step = np.uint32(0)
            for extras in (None, neutral_sampling_extras(B, self.vocab_size)):
                sample_args.append((logits, greedy_sampling_batch(B), extras, self._base_key, step))
        hidden = self._forward.jitted.eval_shape(*forward_args[0])[2]
        logits_args, rejection_args = self._verify_examples(hidden)
        # Lowering is Python (one thread); compiles, and loads from the persistent cache, run
        # on the pool meanwhile, outside the GIL.
        def bucket_done(T, seconds, remaining):
            logger.info("xla-inference: compiled bucket tokens=%d (seqs=%d) in %.1fs; %d of %d "
                        "remain", T, self.layout_for(T).num_seqs, seconds, remaining,
                        len(self.token_buckets))

        # A LoRA engine also compiles the base program for its steps without adapters.
        base_args = [] if self.lora is None else [
            (self._param_leaves, *a[1:], *_argmax_arg(self._forward_base)) for a in forward_args]
        with concurrent.futures.ThreadPoolExecutor(_compile_threads()) as pool:
            by_address = self._submit_by_address(forward_args, pool)
            forward = self._forward.submit(
                [a for a, T in zip(forward_args, self.token_buckets) if not self._by_address(T)],
                pool)
            base = {} if self.lora is None else self._forward_base.submit(base_args, pool)
            samplers = {k: p.submit(sample_args, pool) for k, p in self._samplers.items()}
            verify = (self._draft_rows_logits.submit(logits_args, pool),
                      self._rejection.submit(rejection_args, pool))
            self._forward.collect(forward, bucket_done)
            if by_address:
                self._forward_table.collect(by_address, bucket_done)
            if base:
                self._forward_base.collect(base)
            for k, futures in samplers.items():
                self._samplers[k].collect(futures)
            self._draft_rows_logits.collect(verify[0])
            self._rejection.collect(verify[1])
        # Run each forward bucket once on its empty batch (padding writes only the null
        # page): an XLA CPU executable's first run is markedly slower than later ones
        # (benchmarks/RESULTS.md), which would land on the first request of each bucket.
        jax_setup.wait_for_other_processes("warm-up compiled", envs.join_timeout())
        run_start = time.perf_counter()
        for T, args in zip(self.token_buckets, forward_args):
            program, params = self._step_program(T, args[0])
            self.kv_cache = program(params, self.kv_cache, *args[2:])[0]
        for args in base_args:
            self.kv_cache = self._forward_base(args[0], self.kv_cache, *args[2:])[0]
        jax.block_until_ready(self.kv_cache)
        logger.info("xla-inference: ran each forward bucket once in %.1fs",
                    time.perf_counter() - run_start)
        hidden = np.zeros((1, hidden.shape[1]), hidden.dtype)
        for k in () if self.pooling else self._scorers:
            self.score_tokens(hidden, np.zeros(1, np.int32), np.zeros(1, np.int32), k)
        if self.lora is not None:
            self.lora.warm_up()
        mm = self.model.multimodal
        if mm is not None and mm.fixed_grids is not None:
            encoder_grids = [*encoder_grids, *mm.fixed_grids(self.model_cfg)]
        for grid in encoder_grids:
            mm.warm_up(self.params, self.model_cfg, grid, np.uint8 if raw_pixels else np.float32)
        if encoder_grids:
            logger.info("xla-inference: compiled %d forward buckets, %d sampler programs, %d verify "
                    "programs and the scorer in %.1fs (%d at a time)", len(forward),
                    sum(len(f) for f in samplers.values()), sum(len(f) for f in verify),
                    time.perf_counter() - start, _compile_threads())
        if not self.pooling and self._samples_first_rows:
            self._warm_up_row_slices()
        if self.feeds_tokens:
            self._warm_up_feed()
        compile_counter.mark_warm()
        return time.perf_counter() - start

    def _submit_by_address(self, forward_args, pool) -> dict:
        """Lower the weights-by-address program for the buckets it runs (warm_up's args of
        the others' program, groups of one) and hand their compiles to `pool`. Where a model
        reads such a weight as an array (anything but the native kernel's one-row entries
        multiplying it), the engine keeps every array a parameter: {} then."""
        if self._forward_table is None:
            return {}
        args = [(self._table_params, *a[1:])
                for a, T in zip(forward_args, self.token_buckets) if self._by_address(T)]
        try:
            return self._forward_table.submit(args, pool)
        except cpu_quantized.TableWeightMisuse as e:
            self._keep_weight_arrays(e)
            return {}

    def _keep_weight_arrays(self, error: Exception) -> None:
        logger.warning("xla-inference: this model's quantized weights stay program arguments "
                       "(%s)", error)
        self._forward_table, self._table_params, self._weight_table = None, None, None

    def _warm_up_feed(self) -> None:
        """Compile _feed_tokens for every bucket and every row count a sampler returns."""
        S, whole = self.cfg.max_num_seqs, replicated(self.mesh)
        program = self._samplers[self.logprobs_width(())]
        for B in self._bucket_row_counts:
            # the sampler's own tokens: the sharding the steps will pass
            logits = jax.device_put(np.zeros((B, self.vocab_size), np.float32), whole)
            tokens = program(logits, greedy_sampling_batch(B), None, self._base_key,
                             np.uint32(0)).tokens
            for T in self.token_buckets:
                self._feed(np.zeros(T, np.int32), tokens, np.full(S, T, np.int32),
                           np.zeros(S, np.int32))

    def _verify_examples(self, hidden) -> tuple[list[tuple], list[tuple]]:
        """verify_drafts' argument shapes for every token bucket: the draft rows' logits,
        and rejection sampling with and without the per-row extras (penalties, allowed ids,
        bad words, min_tokens, grammar). None without speculative decoding (or with pipeline
        stages, which it refuses). Data parallel: a step's hidden states are every replica's
        tokens of its bucket, in the scheduler's order ([R*T, D], _forward_replicas)."""
        K = self.cfg.num_speculative_tokens
        if K == 0 or self.microbatches > 1:
            return [], []
        logits_args, rejection_args = [], []
        whole = replicated(self.mesh)  # as the forward's and the draft rows' outputs
        for T in self.token_buckets:
            states = jax.ShapeDtypeStruct((self.replicas * T, hidden.shape[1]), hidden.dtype,
                                          sharding=whole)
            for B in self._verify_slot_counts:  # _verify_slots' choices for T's steps
                if not self._verify_rows_fit(T, B):
                    break
                rows = np.zeros(B * (K + 1), np.int32)
                logits_args.append((self._head_params(rows), states, rows))
        for B in self._verify_slot_counts:
            rows = np.zeros(B * (K + 1), np.int32)
            shape = self._draft_rows_logits.jitted.eval_shape(
                self._head_params(rows), states, rows)  # the last bucket's
            logits = jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=whole)
            for extras in (None, neutral_draft_extras(B, K, self.vocab_size)):
                rejection_args.append((logits, build_draft_batch([], B, K),
                                       greedy_sampling_batch(B), extras, self._base_key,
                                       np.uint32(0)))
        return logits_args, rejection_args


# Families whose forward runs its layers through models/decoder.run_layers with layers
# alike in weights and cache: what pipeline parallel has been proven on.
PIPELINE_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def _check_pipeline(model: ModelFamily, model_cfg, engine_cfg: EngineConfig, mesh: Mesh,
                    pooling: bool) -> None:
    """Refuse, by name, what pipeline stages do not serve (yet)."""
    stages = num_stages(mesh)
    layers = model.kv_layers(model_cfg)
    refusals = [
        (model.name not in PIPELINE_FAMILIES or getattr(model_cfg, "moe", None) is not None,
         f"the {model.name} family{' (MoE)' if getattr(model_cfg, 'moe', None) else ''}; it "
         f"serves {', '.join(PIPELINE_FAMILIES)} (dense)"),
        (len(layers) % stages != 0, f"{len(layers)} layers in {stages} stages (uneven)"),
        (pooling, "pooling models"),
    ]
    groups, arrays = engine_cfg.kv_layout(len(layers))
    refusals.append((len(set(groups)) > 1 or arrays != tuple(range(len(layers)))
                     or len(set(layers)) > 1,
                     "layers of several KV cache groups or kinds (e.g. sliding and full)"))
    for refused, what in refusals:
        if refused:
            raise ValueError(f"xla-inference does not run pipeline parallel with {what} yet")


def _stack(batches: list[StepBatch]) -> StepBatch:
    """Replicas' batches of one bucket -> one batch with a leading replica axis."""
    return jax.tree.map(lambda *arrays: np.stack(arrays), *batches)


def _by_replica(batch: StepBatch, replicas: int) -> StepBatch:
    """A batch of R * M stacked groups (replica-major) -> [R, M, ...]: each replica's
    micro-batches under its own leading index (pipeline stages with data parallel)."""
    return jax.tree.map(lambda a: a.reshape(replicas, -1, *a.shape[1:]), batch)
