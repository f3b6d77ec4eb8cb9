"""Async scheduling's overlap: a step's sampled tokens stay on device until vLLM asks.

Under async scheduling (vLLM's default for one engine process) the engine core schedules
and dispatches step N + 1 before it takes step N's output. A runner that returns step N's
tokens synchronously makes that order pointless: every token then waits for the host's
whole round (vLLM's bookkeeping and output, the next step's build and dispatch, ~5 ms on a
2-core CPU) and only then for the device. Here step N's sample returns an
AsyncModelRunnerOutput at once; its tokens are copied to the host when vLLM asks for them,
by which time step N + 1 runs on the device: it was built with a placeholder where each
request's newest token goes and takes that token from step N's device array
(ModelEngine.forward's `fed`). So the host's round overlaps the device's step.

Steps that need the tokens on the host (logprobs, penalties and other per-token extras,
structured output, drafts, prompt logprobs, KV connectors, and engines whose steps are
built otherwise: data parallel, pipeline, images, pooling) resolve the pending tokens
first and run as before.
"""

import numpy as np
from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

from xla_inference.runner.requests import RequestState

# A token id no vocabulary has: where a request's newest token goes until it reaches the
# host (its count is right for vLLM's bookkeeping; its value is never read).
PLACEHOLDER = -1


class PendingTokens:
    """One step's sampled tokens on device, and where each belongs: (request, index in its
    token_ids, row of the tokens)."""

    def __init__(self, tokens, slots: list[tuple[RequestState, int, int]]):
        self.tokens, self.slots, self.host = tokens, slots, None
        self._row_of = {id(req): (index, row) for req, index, row in slots}

    @property
    def resolved(self) -> bool:
        return self.host is not None

    def resolve(self) -> np.ndarray:
        """Copy the tokens to the host (once) and put each in its request's place: where a
        request's tokens were replaced meanwhile (vLLM resent them), the placeholder is gone
        and nothing is written."""
        if self.host is None:
            self.host = np.asarray(self.tokens)
            for req, index, row in self.slots:
                if index < len(req.token_ids) and req.token_ids[index] == PLACEHOLDER:
                    req.token_ids[index] = int(self.host[row])
        return self.host

    def rows_for(self, scheduled: list[tuple[RequestState, int]]) -> list[int] | None:
        """Per scheduled request, the row of its newest token when that token is pending
        here and among the tokens it runs now, else -1; None when the step holds a
        placeholder these tokens do not fill."""
        rows = []
        for req, num_new in scheduled:
            first = req.num_computed_tokens
            window = req.token_ids[first:first + num_new]
            pending = self._row_of.get(id(req))
            if pending is not None and pending[0] == len(req.token_ids) - 1 \
                    and first <= pending[0] < first + num_new:
                rows.append(pending[1])
                if PLACEHOLDER in window[:-1]:
                    return None
            elif PLACEHOLDER in window:
                return None
            else:
                rows.append(-1)
        return rows


class AsyncStepOutput(AsyncModelRunnerOutput):
    """A sampled step's ModelRunnerOutput, built when vLLM asks (get_output blocks until the
    step's tokens are on the host)."""

    def __init__(self, pending: PendingTokens, req_ids: list[str], rows: list[int]):
        self.pending, self.req_ids, self.rows = pending, req_ids, rows

    def get_output(self) -> ModelRunnerOutput:
        host = self.pending.resolve()
        return ModelRunnerOutput(
            req_ids=self.req_ids,
            req_id_to_index={rid: i for i, rid in enumerate(self.req_ids)},
            sampled_token_ids=[[int(host[row])] if row >= 0 else [] for row in self.rows],
            logprobs=None, prompt_logprobs_dict={})
