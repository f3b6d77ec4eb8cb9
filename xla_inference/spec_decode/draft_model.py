"""Speculative decoding with a draft model (vLLM's method "draft_model"): a small model of
the target's vocabulary proposes k tokens per request greedily, on its own engine (its own
weights and KV arrays) over the target's KV pages.

vLLM's KV cache config holds the draft's layers beside the target's, in the same KV cache
groups: each request's block table serves both models, and the scheduler reserves k
lookahead slots past the target's tokens for the draft's speculative positions.

After each target step, for every request of the step, the draft catches up on the tokens it
has not seen: those the target computed (prompt chunks, accepted drafts) and the token just
sampled, one ahead of the target. A request that sampled then drafts k tokens greedily: the
catch-up's last row gives the first draft, and k - 1 one-token steps the others. The KV the
draft wrote for its own drafts is rewritten by the next catch-up (which starts at the first
draft's position), so only positions before `computed` are trusted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xla_inference.runner.engine import ModelEngine
from xla_inference.runner.requests import RequestState


class DraftProposer:
    """Greedy drafts from `engine` (a greedy_drafter ModelEngine) for the target's requests.

    groups: the target's KV cache groups the draft's layers read, in the draft engine's
    group order (its block tables are the requests' block_ids of those groups)."""

    def __init__(self, engine: ModelEngine, groups: tuple[int, ...], num_speculative_tokens: int,
                 max_model_len: int):
        if not engine.greedy_drafter:
            raise ValueError("DraftProposer needs an engine built with greedy_drafter=True")
        self.engine, self.groups = engine, groups
        self.num_speculative_tokens, self.max_model_len = num_speculative_tokens, max_model_len
        self.computed: dict[str, int] = {}  # request -> positions whose draft KV is valid
        self.max_tokens = engine.token_buckets[-1]
        self.max_rows = engine.cfg.max_num_seqs
        self.forward_steps = 0  # draft forwards run (tests)

    def forget(self, req_id: str) -> None:
        """A finished request, or one resumed on new pages: its draft KV is gone."""
        self.computed.pop(req_id, None)

    def start_step(self, requests: list[RequestState]) -> None:
        """Before the target's step: a request the draft has not seen (new, resumed) has valid
        draft KV exactly where the target has (its computed tokens: prefix-cached pages were
        filled by both models)."""
        for r in requests:
            known = self.computed.get(r.req_id, r.num_computed_tokens)
            self.computed[r.req_id] = min(known, r.num_computed_tokens + 1)

    def propose(self, requests: list[RequestState], sampled: list[list[int]]) -> list[list[int]]:
        """After the target's step (requests' token_ids and num_computed_tokens updated):
        each request's drafts ([] for a prompt chunk in progress)."""
        catch_up, drafting = [], []
        for r, new in zip(requests, sampled):
            start = self.computed.get(r.req_id, r.num_computed_tokens)
            capacity = self._capacity(r)
            end = min(len(r.token_ids), r.num_computed_tokens + 1, capacity)
            if end > start:
                catch_up.append((r, start, end))
            self.computed[r.req_id] = max(start, end)
            num = len(r.token_ids)
            # Draft j is read at position num + j - 2 (a page must be there) and lands at
            # num + j - 1 (within max_model_len).
            k = min(self.num_speculative_tokens, self.max_model_len - num, capacity - num + 1)
            drafting.append(k if new and end == num and end > start else 0)
        last_rows = self._run_catch_up(catch_up)
        drafts = [[last_rows[r.req_id]] if k > 0 else [] for r, k in zip(requests, drafting)]
        self._extend_drafts(requests, drafts, drafting)
        return drafts

    def _capacity(self, r: RequestState) -> int:
        """Positions the request has pages for, in every group the draft reads."""
        bs = self.engine.cfg.block_size
        return min(len(r.block_ids[g]) * bs for g in self.groups)

    def _view(self, r: RequestState, token_ids: list[int], start: int) -> RequestState:
        """The request as the draft engine sees it: its tokens from `start` on are new."""
        return dataclasses.replace(r, token_ids=token_ids, num_computed_tokens=start,
                                   block_ids=[r.block_ids[g] for g in self.groups],
                                   prompt_logprobs=None)

    def _run_catch_up(self, work) -> dict[str, int]:
        """Run the draft over each request's [start, end) in steps of at most the largest
        bucket and max_num_seqs rows (a request's span may split across steps, in order);
        -> each request's argmax at its last position."""
        last, batch, owners, used = {}, [], [], 0
        for r, start, end in work:
            while start < end:
                n = min(end - start, self.max_tokens - used)
                batch.append((self._view(r, r.token_ids, start), n))
                owners.append(r.req_id if start + n == end else None)
                used, start = used + n, start + n
                if used == self.max_tokens or len(batch) == self.max_rows:
                    self._run_into(batch, owners, last)
                    batch, owners, used = [], [], 0
        if batch:
            self._run_into(batch, owners, last)
        return last

    def _run_into(self, batch, owners, last: dict[str, int]) -> None:
        tokens = self._argmax(batch)
        for owner, token in zip(owners, tokens):
            if owner is not None:
                last[owner] = int(token)

    def _extend_drafts(self, requests, drafts, drafting) -> None:
        """Drafts 2..k: one token per drafting request and step, fed its previous draft."""
        extended = {r.req_id: r.token_ids + d for r, d in zip(requests, drafts) if d}
        for j in range(2, self.num_speculative_tokens + 1):
            rows = [(r, d) for r, d, k in zip(requests, drafts, drafting) if k >= j]
            if not rows:
                return
            batch = []
            for r, d in rows:
                ids = extended[r.req_id]
                batch.append((self._view(r, ids, len(ids) - 1), 1))
            for (r, d), token in zip(rows, self._argmax(batch)):
                d.append(int(token))
                extended[r.req_id].append(int(token))

    def _argmax(self, batch) -> np.ndarray:
        self.forward_steps += 1
        return np.asarray(self.engine.forward(batch).logits)[:len(batch)]
