"""One check for the drafters that run through spec_decode/eagle.py's drafting loop (EAGLE-1,
DeepSeek's MTP layer): their drafts over a prompt step and a verify step with partly accepted
drafts equal a float64 reference drafter's given the same target hidden states."""

import jax
import numpy as np

from xla_inference.runner.requests import RequestState


def assert_drafts_match_over_a_prompt_and_a_verify_step(proposer, reference_drafter, *, k: int,
                                                        hidden_size: int, vocab: int,
                                                        rows: int, rng) -> None:
    """`reference_drafter.propose(token_ids, hidden [N - 1, H] float64, k)` gives the k drafts
    after a request's tokens. Three prompts (the last cut in two chunks), then a verify step:
    one draft accepted, none, the prompt's end. Each step's target rows hold the hidden state
    of every kept position (the rest random: rejected drafts' rows the drafter must not keep)."""
    true_hidden = {}

    def hidden_at(rid, p):
        return true_hidden.setdefault((rid, p),
                                      rng.standard_normal(hidden_size).astype(np.float32))

    def step(scheduled, kept):
        hidden = rng.standard_normal((rows, hidden_size)).astype(np.float32)
        row = 0
        for (req, n), keep in zip(scheduled, kept):
            for j in range(keep):
                hidden[row + j] = hidden_at(req.req_id, req.num_computed_tokens + j)
            row += n
        proposer.saw_target_step(scheduled, jax.device_put(hidden))

    def reference(req):
        n = len(req.token_ids)
        h = np.stack([hidden_at(req.req_id, p) for p in range(n - 1)]).astype(np.float64)
        return reference_drafter.propose(req.token_ids, h, k)

    reqs = [RequestState(f"r{i}", rng.integers(3, vocab, n).tolist(), n,
                         [list(range(1 + 16 * i, 17 + 16 * i))], 0)
            for i, n in enumerate((3, 6, 9))]
    scheduled = [(reqs[0], 3), (reqs[1], 6), (reqs[2], 5)]  # the last prompt in two chunks
    step(scheduled, [3, 6, 5])
    for req, n in scheduled:
        req.num_computed_tokens += n
        if req.num_computed_tokens == len(req.token_ids):
            req.token_ids.append(int(rng.integers(3, vocab)))
    drafts = proposer.propose(reqs, [[1], [1], []])
    assert drafts[2] == []
    assert drafts[:2] == [reference(r) for r in reqs[:2]]

    scheduled = [(reqs[0], 1 + k), (reqs[1], 1 + k), (reqs[2], 4)]
    step(scheduled, [2, 1, 4])  # one draft accepted; none; the prompt's end
    emitted = [drafts[0][:1] + [int(rng.integers(3, vocab))], [int(rng.integers(3, vocab))],
               [int(rng.integers(3, vocab))]]
    for (req, n), out in zip(scheduled, emitted):
        req.num_computed_tokens += len(out) if req is not reqs[2] else n
        req.token_ids.extend(out)
    drafts = proposer.propose(reqs, [[1]] * 3)
    assert all(len(d) == k for d in drafts)
    assert drafts == [reference(r) for r in reqs]
