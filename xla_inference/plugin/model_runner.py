"""Turns vLLM's SchedulerOutput diffs into engine steps, and tokens into ModelRunnerOutput."""

import logging

import numpy as np
import torch
from vllm.v1.outputs import (EMPTY_MODEL_RUNNER_OUTPUT, DraftTokenIds, LogprobsLists,
                             LogprobsTensors, ModelRunnerOutput)

from xla_inference.models.interface import PIXEL_AFFINE, MultimodalItem
from xla_inference.plugin.async_output import AsyncStepOutput, PendingTokens, new_placeholder
from xla_inference.runner.engine import ModelEngine
from xla_inference.runner.requests import RequestState
from xla_inference.sampling.host import SamplingOptions, logprobs_rows, unpack_grammar_bitmask

logger = logging.getLogger(__name__)

# vLLM: temperatures below this are greedy; (eps, 0.01) is raised to 0.01.
_GREEDY_TEMPERATURE = 1e-5
_MIN_TEMPERATURE = 0.01


def multimodal_items(features, pixel_affine=None) -> list[MultimodalItem]:
    """vLLM's MultiModalFeatureSpecs of a new request -> the engine's items, in vLLM's order
    (scheduled_encoder_inputs index them), the processor's tensors as numpy. pixel_affine
    (mm_pixel_affine's): added to each item's data when its pixels come raw."""
    items = []
    for feature in features or ():
        place = feature.mm_position
        # Placeholders that are only partly embeddings (Gemma 3's hold the image's begin and
        # end tokens) keep the mask of those that are.
        is_embed = None
        if place.is_embed is not None and not bool(place.is_embed.all()):
            is_embed = np.asarray(place.is_embed, dtype=bool)
        data = None if feature.data is None else {
            key: _host_array(element.data) for key, element in feature.data.items()}
        if data is not None and pixel_affine is not None:
            data[PIXEL_AFFINE] = pixel_affine
        items.append(MultimodalItem(feature.identifier, feature.modality, place.offset,
                                    place.length, data, is_embed))
    return items


def mm_pixel_affine(model_config):
    """With vLLM's on-device normalization (mm_device_do_normalize, its default for
    Qwen2.5-VL) the processor hands raw uint8 pixels to the model, sparing the front end a
    float pass over every pixel and shrinking what crosses to the engine 4x; then the
    encoder applies the processor's per-channel scale and shift: [2, channels] float32,
    vLLM's own resolution of them (build_mm_input_norm). None when pixels come normalized."""
    mm = getattr(model_config, "multimodal_config", None)
    if mm is None or not mm.mm_device_do_normalize:
        return None
    from vllm.model_executor.layers.fusion.mm_input_norm import build_mm_input_norm

    norm = build_mm_input_norm(model_config)
    if not hasattr(norm, "weight"):  # the processor's normalization is the identity
        return np.stack([np.ones(3), np.zeros(3)]).astype(np.float32)
    return np.stack([norm.weight.float().cpu().numpy(), norm.bias.float().cpu().numpy()])


def _host_array(value):
    if isinstance(value, torch.Tensor):
        return (value.float() if value.is_floating_point() else value).numpy()
    return np.asarray(value)


def sampling_options(sp) -> SamplingOptions:
    """vLLM SamplingParams -> the engine's normalised SamplingOptions."""
    temperature = float(sp.temperature)
    greedy = temperature < _GREEDY_TEMPERATURE
    return SamplingOptions(
        temperature=0.0 if greedy else max(temperature, _MIN_TEMPERATURE),
        top_k=0 if greedy else max(int(sp.top_k or 0), 0),
        top_p=1.0 if greedy else float(sp.top_p),
        min_p=0.0 if greedy else float(sp.min_p),
        seed=sp.seed,
        presence_penalty=float(sp.presence_penalty),
        frequency_penalty=float(sp.frequency_penalty),
        repetition_penalty=float(sp.repetition_penalty),
        logit_bias=tuple(sorted((int(t), float(b)) for t, b in (sp.logit_bias or {}).items())),
        allowed_token_ids=tuple(sp.allowed_token_ids) if sp.allowed_token_ids else None,
        bad_words=tuple(tuple(w) for w in (sp.bad_words_token_ids or ())),
        min_tokens=int(sp.min_tokens or 0),
        stop_token_ids=tuple(sorted(sp.all_stop_token_ids)),
        num_logprobs=sp.logprobs,  # -1: the whole vocabulary
        num_prompt_logprobs=sp.prompt_logprobs,
        logprob_token_ids=tuple(sp.logprob_token_ids) if sp.logprob_token_ids else None,
    )


class XlaModelRunner:
    """Keeps every request's state across steps; vLLM only sends what changed."""

    def __init__(self, engine: ModelEngine, drafter=None, pooling=None, kv_connector=None,
                 pixel_affine=None):
        self.engine = engine
        # Raw pixels' normalization (mm_pixel_affine), handed to the encoder with each item.
        self.pixel_affine = pixel_affine
        # The KV connector's worker side (kv_transfer/steps.KvConnectorSteps) and the step it
        # has bound; None without --kv-transfer-config.
        self.kv_connector = kv_connector
        self._kv_step = None
        # Speculative decoding (plugin/spec_decode.py): proposes each request's next drafts
        # after a step; None without --speculative-config.
        self.drafter = drafter
        self._draft_token_ids: DraftTokenIds | None = None
        # Async scheduling (vLLM schedules step N + 1 before it has step N's tokens): the
        # drafts proposed after each step, per request, for the -1 placeholders vLLM sends
        # in their place; and, per request whose last step verified placeholder drafts, the
        # num_computed_tokens vLLM assumed (every draft accepted) and the drafts rejected,
        # until vLLM's own count catches up (_correct_optimistic_count).
        self._proposed: dict[str, list[int]] = {}
        self._unseen_rejections: dict[str, tuple[int, int]] = {}
        self._placeholder_steps: set[str] = set()  # this step's requests with placeholders
        # Drafts to propose after this step (vLLM's num_spec_tokens_to_schedule: k, or what
        # num_speculative_tokens_per_batch_size gives for the step's batch size).
        self._num_drafts_wanted = drafter.num_speculative_tokens if drafter else 0
        # A pooling model's requests (plugin/pooling.PoolingRequests); None: generation.
        self.pooling = pooling
        self.requests: dict[str, RequestState] = {}
        self._pending = None  # (scheduled [(state, num_tokens)], StepOutput) between the two calls
        # Null pages in the block ids vLLM handed over, per KV cache group (tests): pages of a
        # sliding window that vLLM freed before a request (re)started.
        self.null_pages_received = [0] * engine.cfg.num_groups
        self._lora_requests = {}  # adapter id -> vLLM's LoRARequest (its path), to reload it
        # Async scheduling's overlap (plugin/async_output.py), set by the worker when vLLM
        # schedules ahead in this one process; the last such step's tokens until resolved.
        self.async_output = False
        self._unresolved: list[PendingTokens] = []  # oldest first
        self.steps_sampled_on_device = 0  # steps whose tokens stayed on device (tests)
        self.steps_fed = 0  # steps that took earlier tokens from the device (tests)
        self.steps_sampled_by_forward = 0  # of those on device, drawn by the step's program

    def lora_slots(self):
        if self.engine.lora is None:
            raise ValueError("LoRA adapters need --enable-lora")
        return self.engine.lora

    def add_lora(self, lora_request) -> bool:
        from vllm.lora.utils import get_adapter_absolute_path

        from xla_inference.lora.peft import load_adapter, refuse_unserved_vocab_targets

        slots = self.lora_slots()
        if lora_request.lora_int_id in slots.host and not lora_request.load_inplace:
            self._lora_requests[lora_request.lora_int_id] = lora_request
            return True
        adapter = load_adapter(get_adapter_absolute_path(lora_request.lora_path),
                               slots.module_shapes, slots.max_rank, lora_request.lora_name,
                               target_modules=slots.target_modules)
        refuse_unserved_vocab_targets(adapter, lora_request.lora_path,
                                      family=self.engine.model.name)
        slots.add(lora_request.lora_int_id, adapter)
        self._lora_requests[lora_request.lora_int_id] = lora_request  # refused ones: not kept
        return True

    def _reload_evicted_loras(self, scheduled) -> None:
        """A running request's adapter that left the host cache (max_cpu_loras, or removed
        while the request ran) is read again from its path, as vLLM's GPU runner does."""
        if self.engine.lora is None:
            return
        for req, _ in scheduled:
            if req.lora_id and req.lora_id not in self.engine.lora.host:
                self.add_lora(self._lora_requests[req.lora_id])

    def execute_model(self, so):
        self._update_states(so)
        if so.total_num_scheduled_tokens == 0:
            self.engine.stats.idle()
            if self.kv_connector is not None:  # transfers run, and report, on empty steps too
                return self.kv_connector.no_forward(so)
            return EMPTY_MODEL_RUNNER_OUTPUT
        self.engine.stats.step_started()
        scheduled = [(self.requests[rid], n) for rid, n in so.num_scheduled_tokens.items()]
        self._reload_evicted_loras(scheduled)
        for rid, indices in so.scheduled_encoder_inputs.items():  # images to encode now
            self.engine.encode(self.requests[rid], indices)
        if self.pooling is not None:
            return self._pool(scheduled)
        spec = so.scheduled_spec_decode_tokens
        self._placeholder_steps = {r.req_id for r, _ in scheduled
                                   if any(t < 0 for t in spec.get(r.req_id, ()))}
        drafts = [self._step_drafts(r, spec.get(r.req_id, ())) for r, _ in scheduled]
        if self.drafter is not None:
            self.drafter.start_step([r for r, _ in scheduled])
            self._num_drafts_wanted = min(self.drafter.num_speculative_tokens,
                                          so.num_spec_tokens_to_schedule)
        fed = self._fed_tokens(scheduled, any(drafts))
        for req, ids in zip(scheduled, drafts):  # the step's input: known tokens, then drafts
            req[0].token_ids.extend(ids)
        if self.kv_connector is not None:  # loads land before the forward reads them
            self.kv_connector.before_forward(so)
            self._kv_step = so
        # A step whose tokens will stay on device: its program draws them where all are
        # greedy (ModelEngine.forward's `sample`), one program call rather than two.
        sample = (not any(drafts) and not so.has_structured_output_requests
                  and self._samples_on_device([r for r, _ in scheduled], None))
        try:
            # Dispatch only: JAX runs the step asynchronously while vLLM prepares the grammar.
            step = self.engine.forward(scheduled, fed, sample=sample)
            if hasattr(self.drafter, "saw_target_step"):  # EAGLE: reads the step's hidden states
                self.drafter.saw_target_step(scheduled, step.hidden)
        finally:
            for (req, _), ids in zip(scheduled, drafts):
                del req.token_ids[len(req.token_ids) - len(ids):]
        self._pending = (scheduled, step, drafts if any(drafts) else None)
        return None

    def _fed_tokens(self, scheduled, has_drafts: bool):
        """The last async step's tokens for this step's input, still on device (the
        engine's `fed`); None, its tokens first brought to the host, when this step's
        input or its requests' state needs them there."""
        self._unresolved = [p for p in self._unresolved if not p.resolved]
        if not self._unresolved:
            return None
        pending = self._unresolved[-1]
        rows = None
        if len(self._unresolved) == 1 and self.engine.can_feed_tokens and not has_drafts \
                and self.kv_connector is None:
            rows = pending.rows_for(scheduled)
        if rows is None:
            self._resolve_pending()
            return None
        if max(rows, default=-1) < 0:
            return None
        self.steps_fed += 1
        return pending.tokens, rows

    def _resolve_pending(self) -> None:
        for pending in self._unresolved:
            pending.resolve()
        self._unresolved = []

    def _step_drafts(self, req: RequestState, scheduled: list[int]) -> list[int]:
        """The drafts a request's step verifies. Under async scheduling vLLM sends as many
        -1 placeholders as it scheduled drafts: they are the drafts proposed after the
        request's last step, cut to that count, and padded with the last of them where fewer
        were proposed (any token is a valid draft: rejection sampling keeps the target's
        distribution whatever the proposal)."""
        if not scheduled or min(scheduled) >= 0:  # synchronous scheduling: vLLM's own copy
            return list(scheduled)
        own = self._proposed.get(req.req_id) or [req.token_ids[-1]]
        return [own[min(j, len(own) - 1)] for j in range(len(scheduled))]

    def _correct_optimistic_count(self, req: RequestState, scheduler_computed: int) -> None:
        """Async scheduling: vLLM scheduled this step before it saw the last one's accepted
        count, so its num_computed_tokens counts every draft of that step as accepted;
        the rejected ones are subtracted here (once vLLM has caught up it sends the true
        count, lower by the rejections, and nothing is subtracted)."""
        assumed, rejected = self._unseen_rejections.pop(req.req_id, (None, 0))
        if scheduler_computed == assumed:
            req.num_computed_tokens -= rejected

    def take_draft_token_ids(self) -> DraftTokenIds | None:
        """The drafts proposed after the last step (vLLM's engine core takes them between
        steps, synchronous scheduling)."""
        drafts, self._draft_token_ids = self._draft_token_ids, None
        return drafts

    def sample_tokens(self, grammar_output) -> ModelRunnerOutput:
        output = self._sample_tokens(grammar_output)
        if self._kv_step is not None:  # saves, after the forward; what transfers finished
            kv_output, self._kv_step = self.kv_connector.after_step(self._kv_step), None
            if output is EMPTY_MODEL_RUNNER_OUTPUT:  # vLLM's shared instance: not changed
                return ModelRunnerOutput.with_kv_conn_output_only(kv_output)
            output.kv_connector_output = kv_output
        return output

    def _sample_tokens(self, grammar_output) -> ModelRunnerOutput:
        if self._pending is None:
            return EMPTY_MODEL_RUNNER_OUTPUT
        scheduled, step, drafts = self._pending
        self._pending = None
        requests = [req for req, _ in scheduled]
        if drafts is None and self._samples_on_device(requests, grammar_output):
            return self._sample_async(scheduled, step)
        self._resolve_pending()  # what follows reads the requests' tokens on the host
        if drafts is not None:
            return self._verify_drafts(scheduled, step, drafts, grammar_output)
        out = self.engine.sample(step.logits, requests, self._grammar_masks(grammar_output, requests))
        prompt_logprobs = self._prompt_logprobs(scheduled, step.hidden)
        sampled = []
        for (req, num_new), token in zip(scheduled, out.tokens):
            req.num_computed_tokens += num_new
            # A chunk that stops short of the last known token samples nothing.
            if req.num_computed_tokens >= len(req.token_ids):
                req.token_ids.append(int(token))
                sampled.append([int(token)])
            else:
                sampled.append([])
        req_ids = [req.req_id for req in requests]
        self._propose(requests, sampled)
        return ModelRunnerOutput(req_ids=req_ids,
                                 req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
                                 sampled_token_ids=sampled,
                                 logprobs=self._logprobs_lists(requests, out),
                                 prompt_logprobs_dict=prompt_logprobs)

    def _samples_on_device(self, requests: list[RequestState], grammar_output) -> bool:
        """Whether this step's tokens may stay on device until vLLM asks for them: async
        scheduling, and nothing of the step that needs them, or the others', on the host."""
        return (self.async_output and grammar_output is None and self.drafter is None
                and self.kv_connector is None and self.engine.can_feed_tokens
                and not any(r.options.wants_logprobs or r.prompt_logprobs is not None
                            or r.options.needs_extras(r.num_output_tokens) for r in requests))

    def _sample_async(self, scheduled, step) -> AsyncStepOutput:
        """Sample on device; each request that samples gets a placeholder token until vLLM
        takes the output (plugin/async_output.py)."""
        requests = [req for req, _ in scheduled]
        if step.tokens is not None:
            tokens = step.tokens
            self.steps_sampled_by_forward += 1
        else:
            tokens = self.engine.sample_on_device(step.logits, requests)
        slots, rows = [], []
        for row, (req, num_new) in enumerate(scheduled):
            req.num_computed_tokens += num_new
            # A chunk that stops short of the last known token samples nothing.
            if req.num_computed_tokens >= len(req.token_ids):
                placeholder = new_placeholder()
                req.token_ids.append(placeholder)
                slots.append((req, row, placeholder))
                rows.append(row)
            else:
                rows.append(-1)
        pending = PendingTokens(tokens, slots)
        self._unresolved.append(pending)
        self.steps_sampled_on_device += 1
        return AsyncStepOutput(pending, [req.req_id for req in requests], rows)

    def _verify_drafts(self, scheduled, step, drafts, grammar_output) -> ModelRunnerOutput:
        """A step with drafts: each request emits its accepted drafts, then a recovered or
        bonus token (1..n+1 tokens); vLLM's scheduler rolls back the rejected drafts."""
        requests = [req for req, _ in scheduled]
        if any(r.options.wants_logprobs for r in requests):
            raise NotImplementedError("xla-inference does not return logprobs with "
                                      "speculative decoding yet")
        masks = self._draft_grammar_masks(grammar_output, requests, drafts)
        tokens, counts = self.engine.verify_drafts(
            step.hidden, scheduled, drafts, self.drafter.num_speculative_tokens, masks,
            num_acceptable=self._acceptable_drafts(grammar_output, requests, drafts))
        prompt_logprobs = self._prompt_logprobs(scheduled, step.hidden)
        sampled = []
        for (req, num_new), ids, row, count in zip(scheduled, drafts, tokens, counts):
            computed = req.num_computed_tokens + num_new - len(ids)  # drafts are not known yet
            if computed >= len(req.token_ids):
                emitted = [int(t) for t in row[:count]]
                req.token_ids.extend(emitted)
                if req.req_id in self._placeholder_steps:  # vLLM first assumes all accepted
                    self._unseen_rejections[req.req_id] = (req.num_computed_tokens + num_new,
                                                           len(ids) - (count - 1))
                req.num_computed_tokens = computed + count - 1
                sampled.append(emitted)
            else:  # a prompt chunk that stops short of the last known token
                req.num_computed_tokens = computed
                sampled.append([])
        req_ids = [req.req_id for req in requests]
        self._propose(requests, sampled)
        return ModelRunnerOutput(req_ids=req_ids,
                                 req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
                                 sampled_token_ids=sampled, logprobs=None,
                                 prompt_logprobs_dict=prompt_logprobs)

    def _draft_grammar_masks(self, grammar_output, requests, drafts):
        """vLLM's bitmask holds 1 + n rows per structured request, n the drafts it scheduled
        (under async scheduling as many as the placeholders, which the drafts here replace
        one for one: vLLM pads the drafts it validated back to that count with -1), in
        structured_output_request_ids order -> {(batch row, position): bool [V]}."""
        if grammar_output is None:
            return None
        rows = {req.req_id: i for i, req in enumerate(requests)}
        bitmask = np.asarray(grammar_output.grammar_bitmask)
        masks, first = {}, 0
        for rid in grammar_output.structured_output_request_ids:
            row = rows.get(rid)
            n = len(drafts[row]) if row is not None else 0
            if row is not None:
                for j in range(n + 1):
                    masks[row, j] = unpack_grammar_bitmask(bitmask[first + j],
                                                           self.engine.vocab_size)
            first += 1 + n
        if first != len(bitmask):  # another layout: every later request's masks would shift
            raise RuntimeError(f"vLLM's grammar bitmask has {len(bitmask)} rows; the step's "
                               f"structured requests and their drafts need {first}")
        return masks

    @staticmethod
    def _acceptable_drafts(grammar_output, requests, drafts) -> list[int]:
        """How many of each request's drafts may be accepted. vLLM's bitmask constrains a
        structured request's drafts only up to the first one it did not validate: under
        async scheduling it validates the drafts it took from this runner (the ones verified
        here) and pads the rest with -1, or holds only -1 for a request it took none for;
        the rows after the first -1 allow every token, so a draft verified against one
        could emit a token the grammar forbids (GrammarOutput.num_acceptable_drafts: the
        count it constrained; None: no draft)."""
        limits = [len(d) for d in drafts]
        if grammar_output is None:
            return limits
        rows = {req.req_id: i for i, req in enumerate(requests)}
        acceptable = grammar_output.num_acceptable_drafts
        for i, rid in enumerate(grammar_output.structured_output_request_ids):
            row = rows.get(rid)
            if row is not None:
                limits[row] = min(limits[row], 0 if acceptable is None else acceptable[i])
        return limits

    def _propose(self, requests, sampled) -> None:
        if self.drafter is None:
            return
        k = self._num_drafts_wanted
        if k == 0 and getattr(self.drafter, "may_skip_steps", False):
            # vLLM's batch-size schedule turned drafting off: no proposer work on the host.
            self._draft_token_ids = DraftTokenIds([r.req_id for r in requests],
                                                  [[] for _ in requests])
            for req in requests:
                self._proposed.pop(req.req_id, None)
            return
        proposed = self.drafter.propose(requests, sampled)
        if k < self.drafter.num_speculative_tokens:
            proposed.draft_token_ids = [list(d[:k]) for d in proposed.draft_token_ids]
        self._draft_token_ids = proposed
        # Per request: one left out of this step keeps the drafts of its own last step, for
        # the placeholders vLLM scheduled for it then. Copies: vLLM trims the lists it takes
        # (update_draft_token_ids_in_output).
        self._proposed.update((rid, list(d)) for rid, d in zip(proposed.req_ids,
                                                                proposed.draft_token_ids))

    def _pool(self, scheduled) -> ModelRunnerOutput:
        """A pooling step: no sampler; one pooled output per request whose prompt this step
        completes, None for a prompt still in progress (vLLM's pooling runner contract)."""
        step = self.engine.forward(scheduled)
        outputs = self.pooling.step_outputs(scheduled, step.logits, step.hidden)
        for req, num_new in scheduled:
            req.num_computed_tokens += num_new
        req_ids = [req.req_id for req, _ in scheduled]
        return ModelRunnerOutput(req_ids=req_ids,
                                 req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
                                 pooler_output=outputs)

    def _grammar_masks(self, grammar_output, requests) -> dict[int, np.ndarray] | None:
        if grammar_output is None:
            return None
        rows = {req.req_id: i for i, req in enumerate(requests)}
        bitmask = np.asarray(grammar_output.grammar_bitmask)
        return {rows[rid]: unpack_grammar_bitmask(bitmask[i], self.engine.vocab_size)
                for i, rid in enumerate(grammar_output.structured_output_request_ids) if rid in rows}

    def _prompt_logprobs(self, scheduled, hidden) -> dict:
        """Score this step's prompt tokens for requests that asked; hand each request's
        table over in the step that completes its prompt (vLLM expects it then)."""
        rows, targets, spans, done, offset, wanted = [], [], [], {}, 0, []
        row_loras = []  # each row's adapter: an LM head adapter scores its own rows
        for req, num_new in scheduled:
            n = req.options.num_top_prompt_logprobs(self.engine.vocab_size)
            if n is not None and req.num_prompt_tokens > 1 and req.prompt_logprobs is not None:
                wanted.append(n)
                first = req.num_computed_tokens
                count = max(0, min(num_new, req.num_prompt_tokens - 1 - first))
                rows.extend(range(offset, offset + count))
                targets.extend(req.token_ids[first + 1:first + 1 + count])
                row_loras.extend([req.lora_id] * count)
                spans.append((req, first, count))
                if first + num_new >= req.num_prompt_tokens:
                    done[req.req_id] = req
            offset += num_new
        if rows:
            ids, logprobs, ranks = self.engine.score_tokens(
                hidden, np.asarray(rows, np.int32), np.asarray(targets, np.int32),
                self.engine.logprobs_width(wanted), lora_ids=row_loras)
            pos = 0
            for req, first, count in spans:
                table = req.prompt_logprobs
                width = table[0].shape[1]
                table[0][first:first + count] = ids[pos:pos + count, :width]
                table[1][first:first + count] = logprobs[pos:pos + count, :width]
                table[2][first:first + count] = ranks[pos:pos + count]
                pos += count
        result = {}
        for rid, req in done.items():
            ids, logprobs, ranks = req.prompt_logprobs
            result[rid] = LogprobsTensors(torch.from_numpy(ids), torch.from_numpy(logprobs),
                                          torch.from_numpy(ranks))
            req.prompt_logprobs = None  # handed over once
        return result

    def _update_states(self, so) -> None:
        self.engine.free_encoder_outputs(so.free_encoder_mm_hashes)
        for rid in so.finished_req_ids:
            self.requests.pop(rid, None)
            self._unseen_rejections.pop(rid, None)
            self._proposed.pop(rid, None)
            if self.drafter is not None:
                self.drafter.forget(rid)
            if self.pooling is not None:
                self.pooling.remove(rid)
        for new in so.scheduled_new_reqs:
            if self.drafter is not None:
                self.drafter.forget(new.req_id)
            prompt = list(new.prompt_token_ids)
            if self.pooling is not None:
                self.pooling.add(new.req_id, new.pooling_params, len(prompt))
            options = (SamplingOptions() if new.sampling_params is None
                       else sampling_options(new.sampling_params))
            state = RequestState(
                req_id=new.req_id, token_ids=prompt, num_prompt_tokens=len(prompt),
                block_ids=self._block_ids(new.block_ids), num_computed_tokens=new.num_computed_tokens,
                options=options)
            num_prompt_logprobs = options.num_top_prompt_logprobs(self.engine.vocab_size)
            if num_prompt_logprobs is not None and len(prompt) > 1:
                # As vLLM's: the prompt token, then the top n (n = V for -1).
                width = num_prompt_logprobs + 1
                state.prompt_logprobs = (np.zeros((len(prompt) - 1, width), np.int32),
                                         np.zeros((len(prompt) - 1, width), np.float32),
                                         np.zeros(len(prompt) - 1, np.int32))
            if new.lora_request is not None:  # loaded now if vLLM did not add it before
                self.add_lora(new.lora_request)
                state.lora_id = new.lora_request.lora_int_id
            state.mm_items = multimodal_items(new.mm_features, self.pixel_affine)
            self.requests[new.req_id] = state
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            req = self.requests[rid]
            req.num_computed_tokens = cached.num_computed_tokens[i]
            if rid in cached.resumed_req_ids:  # its earlier steps' counts no longer matter
                self._unseen_rejections.pop(rid, None)
                self._proposed.pop(rid, None)  # preemption dropped its drafts in vLLM too
            else:
                self._correct_optimistic_count(req, cached.num_computed_tokens[i])
            if rid in cached.all_token_ids:  # not scheduled last step: vLLM resends everything
                req.token_ids = list(cached.all_token_ids[rid])
            req.trim_outputs(cached.num_output_tokens[i])
            new_blocks = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:  # every page anew
                if self.pooling is not None:
                    self.pooling.restart(rid)
                if self.drafter is not None:
                    self.drafter.forget(rid)
                req.block_ids = self._block_ids(new_blocks)
            elif new_blocks is not None:  # pages appended to each group's list
                for ids, new_ids in zip(req.block_ids, new_blocks, strict=True):
                    ids.extend(new_ids)

    def _block_ids(self, groups) -> list[list[int]]:
        """A request's pages, one list per KV cache group, as vLLM sends them whole (a new or
        resumed request); counts the null pages among them."""
        block_ids = [list(ids) for ids in groups]
        if len(block_ids) != len(self.null_pages_received):
            raise ValueError(f"vLLM sent pages of {len(block_ids)} KV cache groups; the engine "
                             f"was built for {len(self.null_pages_received)}")
        per_replica = self.engine.blocks_per_replica  # a replica's null page: a multiple of it
        for g, ids in enumerate(block_ids):
            self.null_pages_received[g] += sum(b % per_replica == 0 for b in ids)
        return block_ids

    def _logprobs_lists(self, requests: list[RequestState], out) -> LogprobsLists | None:
        """The sampled token's logprob, then the top n or the logprob_token_ids asked for, as
        wide as the widest request (vLLM's output processor keeps each request's own n)."""
        rows = logprobs_rows([r.options for r in requests], out, self.engine.vocab_size)
        return None if rows is None else LogprobsLists(*rows)
