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

import itertools

import numpy as np
from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

from xla_inference.runner.requests import RequestState

# Placeholders are negative token ids (no vocabulary has them), each one a value of its own:
# a request's newest token until it reaches the host. Their count is right for vLLM's
# bookkeeping; the value only says which pending token belongs there, so a token that
# arrives after vLLM replaced a request's tokens (a resumed request's list, resent) never
# lands on another step's placeholder at the same index.
_placeholders = itertools.count(1)


def new_placeholder() -> int:
    return -(next(_placeholders) % (1 << 30) + 1)


class PendingTokens:
    """One step's sampled tokens on device, and where each belongs: (request, row of the
    tokens, the placeholder its token_ids holds for it)."""

    def __init__(self, tokens, slots: list[tuple[RequestState, int, int]]):
        self.tokens, self.slots, self.host = tokens, slots, None
        self._slot_of = {id(req): (row, placeholder) for req, row, placeholder in slots}

    @property
    def resolved(self) -> bool:
        return self.host is not None

    def resolve(self) -> np.ndarray:
        """Copy the tokens to the host (once) and put each in its placeholder's place; a
        request whose tokens vLLM replaced meanwhile has no such placeholder: nothing is
        written."""
        if self.host is None:
            self.host = np.asarray(self.tokens)
            for req, row, placeholder in self.slots:
                for index in range(len(req.token_ids) - 1, -1, -1):
                    if req.token_ids[index] == placeholder:
                        req.token_ids[index] = int(self.host[row])
                        break
        return self.host

    def rows_for(self, scheduled: list[tuple[RequestState, int]]) -> list[int] | None:
        """Per scheduled request, the row of its newest token when that token is pending
        here and among the tokens it runs now, else -1; None when the step holds a
        placeholder these tokens do not fill."""
        rows = []
        for req, num_new in scheduled:
            first = req.num_computed_tokens
            window = req.token_ids[first:first + num_new]
            row, placeholder = self._slot_of.get(id(req), (-1, None))
            fed = bool(window) and first + num_new == len(req.token_ids) \
                and window[-1] == placeholder
            if any(t < 0 for t in (window[:-1] if fed else window)):
                return None
            rows.append(row if fed else -1)
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
