"""Speculative decoding with an EAGLE head (EAGLE-3: models/eagle3.py, EAGLE-1:
models/eagle1.py, DeepSeek's MTP layer: models/deepseek_mtp.py): after each target step,
the head catches up on the positions the target computed and drafts k tokens per request
greedily, its KV in its own arrays over the target's pages.

A head module provides first_hidden(params, target hidden rows, cfg) -> h, forward(params,
kv_cache, batch, h, cfg) -> (kv_cache, normed, pre-norm), draft_tokens(params, normed),
kv_layers(cfg) and target_hidden_width(cfg).

At a position p the head reads the token at p + 1 and the target's hidden states at p
(EAGLE-3: the aux states; EAGLE-1 and MTP: the final ones),
so it can run exactly the positions the target has just computed and kept: [computed
before the step, computed after it) of each request (the prompt chunk, or the verified
token and the accepted drafts). Their aux states are rows of the step's hidden states
(models/eagle3.with_aux_hidden_states), gathered on device. The last of those rows, for a
request that sampled, gives the first draft; k - 1 one-token steps then draft on, each fed
the previous draft and the head's own pre-norm output. The KV the head wrote at draft
positions is rewritten by the next catch-up, which starts there. Nothing is kept between
steps beyond the KV.

Programs, compiled at warm-up for every token bucket of the target: the catch-up (over the
target step's bucket, gathering its hidden rows) and the one-token draft step.

Data parallel replicas (limits.replicas R > 1): the head's KV is [R, slots, K, H], each
replica's share of the pages on its own slice of the mesh's data axis, as the target's
cache is (runner/engine._allocate_kv_cache). Each program runs every replica on its own
requests (known by their pages), batch and KV (shard_map over the data axis, as the
target's step and a draft model's), each replica's batch padded to one bucket; the target
step's hidden states (every replica's tokens in the scheduler's order, replicated) are read
by every replica through its own gather rows.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.kernels.metadata import KvCache
from jax.sharding import PartitionSpec

from xla_inference.parallel.sharding import (kv_cache_sharding, mark_tensor_splits,
                                             param_shardings, place, replica_sharding,
                                             replicated, traced_over)
from xla_inference.runner import compile_counter
from xla_inference.runner.buckets import pick_bucket, seqs_for_tokens
from xla_inference.runner.engine import Programs, _compile_threads, _stack
from xla_inference.runner.requests import BatchLayout, RequestState, build_step_batch


@dataclasses.dataclass(frozen=True)
class EagleLimits:
    """What the head's steps share with the target's engine."""

    token_buckets: tuple[int, ...]  # a replica's (the target's buckets)
    max_num_seqs: int  # a replica's
    max_model_len: int
    block_size: int
    num_slots: int  # KV slots of a replica's pages (its pages x block_size)
    groups: tuple[int, ...]  # the target's KV cache groups the head's layer reads (one)
    num_speculative_tokens: int
    replicas: int = 1  # data parallel: replica r's pages are r * pages_per_replica onwards

    @property
    def pages_per_replica(self) -> int:
        return self.num_slots // self.block_size


def _catch_up(head, cfg, params, kv, batch, target_hidden, rows):
    """The head over the target's computed positions: h from the target step's hidden
    rows `rows` [T]. -> (kv, first drafts [B], pre-norm [B, D])."""
    return _step(head, cfg, params, kv, batch, head.first_hidden(params, target_hidden[rows], cfg))


def _draft(head, cfg, params, kv, batch, hidden):
    """One draft per request: hidden [T, D] the head's pre-norm output of the draft before."""
    return _step(head, cfg, params, kv, batch, hidden)


def _step(head, cfg, params, kv, batch, hidden):
    kv, normed, prenorm = head.forward(params, kv, batch, hidden, cfg)
    rows = batch.logits_indices
    return kv, head.draft_tokens(params, normed[rows]), prenorm[rows]


def _over_replicas(step, mesh, params, kv, batch, *inputs):
    """Data parallel: `step` run by each data slice on its own replica's KV, batch and
    per-token input (the last of `inputs`, [R, T, ...]); the others (the target step's
    hidden states) whole on every slice. -> (kv [R, ...], tokens [R, B], pre-norm [R, B, D])."""
    local = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731 (this slice's replica)

    def replica(params, kv, batch, *inputs):
        *whole, own = inputs
        kv, tokens, prenorm = step(params, local(kv), local(batch), *whole, own[0])
        return jax.tree.map(lambda a: a[None], kv), tokens[None], prenorm[None]

    data, whole = PartitionSpec("data"), PartitionSpec()
    in_specs = (whole, data, data, *(whole,) * (len(inputs) - 1), data)
    return jax.shard_map(replica, mesh=mesh, in_specs=in_specs, out_specs=(data, data, data),
                         axis_names={"data"}, check_vma=False)(params, kv, batch, *inputs)


def _catch_up_key(params, kv, batch, target_hidden, rows):
    return batch.input_ids.shape[-1]


def _draft_key(params, kv, batch, hidden):
    return batch.input_ids.shape[-1]


class EagleProposer:
    """Greedy EAGLE drafts for the target's requests (module docstring); `head` the head's
    module (models/eagle3 or models/eagle1)."""

    def __init__(self, head, params, cfg, limits: EagleLimits, mesh, kv_dtype):
        self.head, self.cfg, self.limits, self.mesh = head, cfg, limits, mesh
        whole = replicated(mesh)
        # A head whose layers are the target's kind (SHARDED_AS_TARGET: DeepSeek's MTP
        # layer, an MLA + MoE block as large as a target layer) is split over the
        # tensor-parallel axis as the target's layers are; the small EAGLE heads (a layer or
        # few) are replicated beside the target's hidden states. Arrays already on the mesh
        # (the target's embedding or LM head) stay as they are.
        self.sharded = getattr(head, "SHARDED_AS_TARGET", False)
        if self.sharded:
            params, shardings = mark_tensor_splits(params, param_shardings(params, cfg, mesh))
            self.params = jax.tree.map(
                lambda a, s: a if isinstance(a, jax.Array) else place(a, s), params, shardings)
        else:
            self.params = jax.tree.map(
                lambda a: a if isinstance(a, jax.Array) else jax.device_put(a, whole), params)
        self.replicas = limits.replicas
        if self.sharded and self.replicas > 1:
            raise ValueError("a head sharded as the target (mtp) is not served with data "
                             "parallel replicas")
        arrays = []
        for layer in head.kv_layers(cfg):
            shape = (limits.num_slots, layer.num_kv_heads, layer.head_size)
            # Sharded as the target: its cache too, by the target's rule (split by KV heads
            # where they divide over the model axis; MLA's one latent head is replicated, as
            # the target's latent cache is). Data parallel: each replica's pages on its own
            # data slice (replicated over the model axis, as the head is).
            if self.replicas > 1:
                shape, sharding = (self.replicas, *shape), replica_sharding(mesh)
            else:
                sharding = kv_cache_sharding(cfg, shape, mesh) if self.sharded else whole
            zeros = jax.jit(functools.partial(jnp.zeros, shape, kv_dtype), out_shardings=sharding)
            arrays.append(tuple(zeros() for _ in range(layer.num_arrays)))  # MLA: one
        n = len(arrays)
        self.kv = KvCache(arrays, tuple(range(n)), (0,) * n)
        kv_sharding = jax.tree.map(lambda a: a.sharding, self.kv)
        jit = functools.partial(jax.jit, out_shardings=(kv_sharding, whole, whole),
                                donate_argnums=(1,))
        # Sharded: traced over the mesh, so that its layers partition what GSPMD cannot (as
        # the target's step is; parallel/sharding.traced_over).
        over_mesh = functools.partial(traced_over, mesh) if self.sharded else (lambda f: f)
        catch_up = functools.partial(_catch_up, head, cfg)
        draft = functools.partial(_draft, head, cfg)
        if self.replicas > 1:
            catch_up = functools.partial(_over_replicas, catch_up, mesh)
            draft = functools.partial(_over_replicas, draft, mesh)
        self._catch_up = Programs(jit(over_mesh(catch_up)), _catch_up_key)
        self._draft = Programs(jit(over_mesh(draft)), _draft_key)
        self._step_rows = None  # the target step's rows: req_id -> (first token, computed)
        self._target_hidden = None
        self.forward_steps = 0  # head forwards run (tests)

    # -- the drafter protocol (plugin/spec_decode.py) ------------------------------------
    def start_step(self, requests) -> None:
        """The head keeps no state per request beyond its KV."""

    def forget(self, req_id: str) -> None:
        """Nothing per request to forget: the next catch-up starts where the target does."""

    def saw_target_step(self, scheduled: list[tuple[RequestState, int]], hidden) -> None:
        """Before the step's results: where each request's tokens are in the step's
        hidden states [T, W], and how far it was computed before the step."""
        rows, first = {}, 0
        for req, num_new in scheduled:
            rows[req.req_id] = (first, req.num_computed_tokens, num_new)
            first += num_new
        self._step_rows, self._target_hidden = rows, hidden

    def propose(self, requests: list[RequestState], sampled: list[list[int]]) -> list[list[int]]:
        """After the step (token_ids and num_computed_tokens updated): each request's drafts,
        [] for a prompt chunk in progress."""
        if self._target_hidden is None:
            raise RuntimeError("EagleProposer.propose before saw_target_step")
        hidden, step_rows = self._target_hidden, self._step_rows
        self._target_hidden = self._step_rows = None
        T = hidden.shape[0] // self.replicas  # the target step's bucket (a replica's)
        work, rows = [], []
        for r in requests:
            first, before, num_new = step_rows[r.req_id]
            n = min(r.num_computed_tokens - before, num_new)
            if n <= 0:
                continue
            rows.append(np.arange(first, first + n, dtype=np.int32))
            # The head reads the token after each position: the request's tokens shifted.
            work.append((self._view(r, r.token_ids[1:], before), n))
        if not work:
            return [[] for _ in requests]
        tokens, prenorm = self._run(self._catch_up, work, T, rows, hidden)
        last = {view.req_id: i for i, (view, _) in enumerate(work)}
        drafts, state = [], []
        for r, new in zip(requests, sampled):
            i = last.get(r.req_id)
            k = self._num_drafts(r) if new and i is not None and \
                r.num_computed_tokens == len(r.token_ids) - 1 else 0
            drafts.append([int(tokens[i])] if k > 0 else [])
            state.append((k, prenorm[i] if k > 0 else None))
        self._draft_on(requests, drafts, state)
        return drafts

    # -- internals ----------------------------------------------------------------------
    def _num_drafts(self, r: RequestState) -> int:
        """Drafts for a request with N tokens: draft j lands at N + j - 1 (within
        max_model_len) and the step that makes it writes KV at N + j - 3 (on a page)."""
        N = len(r.token_ids)
        capacity = min(len(r.block_ids[g]) for g in self.limits.groups) * self.limits.block_size
        return max(0, min(self.limits.num_speculative_tokens, self.limits.max_model_len - N,
                          capacity - N + 2))

    def _view(self, r: RequestState, token_ids: list[int], start: int) -> RequestState:
        return dataclasses.replace(r, token_ids=token_ids, num_computed_tokens=start,
                                   block_ids=[r.block_ids[g] for g in self.limits.groups],
                                   prompt_logprobs=None)

    def _layout(self, T: int) -> BatchLayout:
        lim = self.limits
        return BatchLayout(T, seqs_for_tokens(T, lim.max_num_seqs),
                           -(-lim.max_model_len // lim.block_size), lim.block_size,
                           len(lim.groups))

    def _replica_of(self, view: RequestState) -> int:
        """The data parallel replica whose pages the request holds (any page: null too)."""
        return view.block_ids[0][0] // self.limits.pages_per_replica

    def _run(self, program, work, T: int, per_token: list[np.ndarray], *whole):
        """Run `program` on work [(request view, tokens)] in token bucket T. per_token: each
        request's rows of the program's per-token input ([n, ...]: the catch-up's gather
        rows, a draft step's hidden states), placed at its tokens; whole: the inputs every
        replica reads. -> (tokens [n], pre-norm [n, D]) in work's order."""
        R = self.replicas
        groups, places = [[] for _ in range(R)], []
        filled = np.zeros((R, T, *per_token[0].shape[1:]), per_token[0].dtype)
        used = [0] * R
        for (view, n), values in zip(work, per_token):
            r = self._replica_of(view) if R > 1 else 0
            places.append((r, len(groups[r])))
            groups[r].append((view, n))
            filled[r, used[r]:used[r] + n] = values
            used[r] += n
        layout, pages = self._layout(T), self.limits.pages_per_replica
        batches = [build_step_batch(group, layout, r * pages) for r, group in enumerate(groups)]
        batch, filled = (batches[0], filled[0]) if R == 1 else (_stack(batches), filled)
        self.forward_steps += 1
        self.kv, tokens, prenorm = program(self.params, self.kv, batch, *whole, filled)
        tokens, prenorm = np.asarray(tokens), np.asarray(prenorm)
        tokens, prenorm = tokens.reshape(R, -1), prenorm.reshape(R, -1, prenorm.shape[-1])
        at = tuple(np.array(a) for a in zip(*places))
        return tokens[at], prenorm[at]

    def _draft_on(self, requests, drafts, state) -> None:
        """Drafts 2..k: one token per drafting request and step."""
        shifted = {r.req_id: r.token_ids[1:] + d for r, d in zip(requests, drafts) if d}
        for j in range(2, self.limits.num_speculative_tokens + 1):
            live = [i for i, (k, _) in enumerate(state) if k >= j]
            if not live:
                return
            work, hidden = [], []
            for i in live:
                r = requests[i]
                hidden.append(state[i][1][None])
                # Draft j - 1 sits at position N + j - 2; the head reads it at N + j - 3.
                ids = shifted[r.req_id]
                work.append((self._view(r, ids, len(ids) - 1), 1))
            rows = max(np.bincount([self._replica_of(v) if self.replicas > 1 else 0
                                    for v, _ in work]))  # the busiest replica's
            T = pick_bucket(list(self.limits.token_buckets), int(rows))
            tokens, prenorm = self._run(self._draft, work, T, hidden)
            for row, i in enumerate(live):
                token = int(tokens[row])
                drafts[i].append(token)
                shifted[requests[i].req_id].append(token)
                state[i] = (state[i][0], prenorm[row])

    def warm_up(self, target_dtype) -> float:
        """Compile both programs for every token bucket (the catch-up for target hidden
        states of target_dtype)."""
        import time

        start = time.perf_counter()
        compile_counter.mark_warm(done=False)  # after the target's warm-up: expected here
        whole = replicated(self.mesh)
        R = self.replicas
        lead = (R,) if R > 1 else ()  # data parallel: every replica's batch, stacked
        catch_up, draft = [], []
        for T in self.limits.token_buckets:
            batch = build_step_batch([], self._layout(T))
            if R > 1:
                batch = _stack([batch] * R)
            hidden = jax.ShapeDtypeStruct((R * T, self.head.target_hidden_width(self.cfg)),
                                          target_dtype, sharding=whole)
            catch_up.append((self.params, self.kv, batch, hidden,
                             np.zeros((*lead, T), np.int32)))
            draft.append((self.params, self.kv, batch,
                          np.zeros((*lead, T, self.cfg.hidden_size), self.params.fc.dtype)))
        with concurrent.futures.ThreadPoolExecutor(_compile_threads()) as pool:
            futures = (self._catch_up.submit(catch_up, pool), self._draft.submit(draft, pool))
            self._catch_up.collect(futures[0])
            self._draft.collect(futures[1])
        compile_counter.mark_warm()
        return time.perf_counter() - start
