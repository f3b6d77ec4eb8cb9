"""Turns vLLM's SchedulerOutput diffs into engine steps, and tokens into ModelRunnerOutput."""

import logging

from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from xla_inference.runner.engine import ModelEngine
from xla_inference.runner.requests import RequestState

logger = logging.getLogger(__name__)

# vLLM: temperatures below this are greedy; (eps, 0.01) is raised to 0.01.
_GREEDY_TEMPERATURE = 1e-5
_MIN_TEMPERATURE = 0.01


def _sampling_fields(sp) -> dict:
    temperature = float(sp.temperature)
    if temperature < _GREEDY_TEMPERATURE:
        return dict(temperature=0.0, top_k=0, top_p=1.0)
    return dict(temperature=max(temperature, _MIN_TEMPERATURE),
                top_k=max(int(sp.top_k or 0), 0), top_p=float(sp.top_p))


class XlaModelRunner:
    """Keeps every request's state across steps; vLLM only sends what changed."""

    def __init__(self, engine: ModelEngine):
        self.engine = engine
        self.requests: dict[str, RequestState] = {}
        self._pending = None  # (scheduled [(state, num_tokens)], logits) between the two calls

    def execute_model(self, so):
        self._update_states(so)
        if so.total_num_scheduled_tokens == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT
        scheduled = [(self.requests[rid], n) for rid, n in so.num_scheduled_tokens.items()]
        # Dispatch only: JAX runs the step asynchronously while vLLM prepares the grammar.
        self._pending = (scheduled, self.engine.forward(scheduled))
        return None

    def sample_tokens(self, grammar_output) -> ModelRunnerOutput:
        if self._pending is None:
            return EMPTY_MODEL_RUNNER_OUTPUT
        if grammar_output is not None:
            raise NotImplementedError("xla-inference does not apply grammar bitmasks yet")
        scheduled, logits = self._pending
        self._pending = None
        tokens = self.engine.sample(logits, [req for req, _ in scheduled])
        sampled = []
        for (req, num_new), token in zip(scheduled, tokens):
            req.num_computed_tokens += num_new
            # A chunk that stops short of the last known token samples nothing.
            if req.num_computed_tokens >= len(req.token_ids):
                req.token_ids.append(int(token))
                sampled.append([int(token)])
            else:
                sampled.append([])
        req_ids = [req.req_id for req, _ in scheduled]
        return ModelRunnerOutput(req_ids=req_ids,
                                 req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
                                 sampled_token_ids=sampled)

    def _update_states(self, so) -> None:
        for rid in so.finished_req_ids:
            self.requests.pop(rid, None)
        for new in so.scheduled_new_reqs:
            prompt = list(new.prompt_token_ids)
            self.requests[new.req_id] = RequestState(
                req_id=new.req_id, token_ids=prompt, num_prompt_tokens=len(prompt),
                block_ids=list(new.block_ids[0]), num_computed_tokens=new.num_computed_tokens,
                **_sampling_fields(new.sampling_params))
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            req = self.requests[rid]
            req.num_computed_tokens = cached.num_computed_tokens[i]
            if rid in cached.all_token_ids:  # not scheduled last step: vLLM resends everything
                req.token_ids = list(cached.all_token_ids[rid])
            req.trim_outputs(cached.num_output_tokens[i])
            new_blocks = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                req.block_ids = list(new_blocks[0])
            elif new_blocks is not None:
                req.block_ids.extend(new_blocks[0])
