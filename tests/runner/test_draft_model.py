"""DraftProposer's bookkeeping (spec_decode/draft_model.py) against a stand-in draft engine whose
"model" predicts the last token + 1: which positions each draft forward computes, how catch-up
spans split over forwards, and where drafts stop (pages, max_model_len, prompt chunks)."""

import types

import numpy as np

from xla_inference.spec_decode.draft_model import DraftProposer
from xla_inference.runner.requests import RequestState


class CountingEngine:
    """Records each forward's rows as (request, first position, tokens)."""

    greedy_drafter = True

    def __init__(self, max_tokens: int, max_rows: int, block_size: int = 4):
        self.token_buckets = [max_tokens]
        self.cfg = types.SimpleNamespace(max_num_seqs=max_rows, block_size=block_size)
        self.steps = []

    def forward(self, batch):
        assert sum(n for _, n in batch) <= self.token_buckets[-1]
        assert len(batch) <= self.cfg.max_num_seqs
        rows = [(r.req_id, r.num_computed_tokens,
                 r.token_ids[r.num_computed_tokens:r.num_computed_tokens + n]) for r, n in batch]
        self.steps.append(rows)
        return types.SimpleNamespace(logits=np.array([ids[-1] + 1 for _, _, ids in rows]))


def _request(rid, tokens, computed, pages=8):
    return RequestState(req_id=rid, token_ids=list(tokens), num_prompt_tokens=len(tokens),
                        block_ids=[list(range(1, pages + 1))], num_computed_tokens=computed)


def test_a_finished_prompt_catches_up_in_pieces_then_drafts_k_tokens():
    engine = CountingEngine(max_tokens=4, max_rows=2)
    proposer = DraftProposer(engine, (0,), num_speculative_tokens=3, max_model_len=64)
    req = _request("a", range(10, 20), computed=0)
    proposer.start_step([req])
    req.num_computed_tokens = 10  # the target computed the prompt and sampled token 20
    req.token_ids.append(20)
    assert proposer.propose([req], [[20]]) == [[21, 22, 23]]
    assert engine.steps == [
        [("a", 0, [10, 11, 12, 13])], [("a", 4, [14, 15, 16, 17])], [("a", 8, [18, 19, 20])],
        [("a", 11, [21])], [("a", 12, [22])]]
    assert proposer.computed["a"] == 11


def test_a_verified_step_recomputes_from_the_first_draft_and_chunks_draft_nothing():
    engine = CountingEngine(max_tokens=8, max_rows=4)
    proposer = DraftProposer(engine, (0,), num_speculative_tokens=2, max_model_len=64)
    decoding = _request("d", range(1, 7), computed=5)
    chunk = _request("c", range(30, 42), computed=0)
    proposer.computed["d"] = 6  # one ahead of the target, as after its last proposal
    proposer.start_step([decoding, chunk])
    decoding.token_ids += [7, 8]  # one draft accepted, then the correction
    decoding.num_computed_tokens = 7
    chunk.num_computed_tokens = 4  # a prompt chunk: nothing sampled
    assert proposer.propose([decoding, chunk], [[7, 8], []]) == [[9, 10], []]
    # The chunk's draft KV runs one token ahead of the target's (position 4 too).
    assert engine.steps == [[("d", 6, [7, 8]), ("c", 0, [30, 31, 32, 33, 34])],
                            [("d", 8, [9])]]
    assert proposer.computed == {"d": 8, "c": 5}


def test_drafts_stop_at_the_pages_held_and_at_max_model_len():
    engine = CountingEngine(max_tokens=16, max_rows=4)
    proposer = DraftProposer(engine, (0,), num_speculative_tokens=3, max_model_len=12)
    # 2 pages of 4 tokens hold positions 0..7, and draft j is read at position 8 + j - 2:
    # one draft. 11 tokens of at most 12: one more.
    short_of_pages = _request("p", range(1, 8), computed=0, pages=2)
    near_the_end = _request("m", range(1, 11), computed=0)  # 11 tokens of 12 after sampling
    for req, token in ((short_of_pages, 50), (near_the_end, 60)):
        proposer.start_step([req])
        req.num_computed_tokens = len(req.token_ids)
        req.token_ids.append(token)
    drafts = proposer.propose([short_of_pages, near_the_end], [[50], [60]])
    assert drafts == [[51], [61]]


def test_a_resumed_request_starts_again_where_the_target_has():
    engine = CountingEngine(max_tokens=16, max_rows=4)
    proposer = DraftProposer(engine, (0,), num_speculative_tokens=1, max_model_len=64)
    req = _request("r", range(1, 9), computed=4)
    proposer.computed["r"] = 9
    proposer.forget("r")  # resumed on new pages; 4 tokens found in the prefix cache
    proposer.start_step([req])
    req.num_computed_tokens = 8
    req.token_ids.append(9)
    assert proposer.propose([req], [[9]]) == [[10]]
    assert engine.steps == [[("r", 4, [5, 6, 7, 8, 9])]]
