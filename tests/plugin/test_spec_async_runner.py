"""The model runner's side of vLLM's async scheduling with speculative decoding
(plugin/model_runner.py): the drafts a step verifies in place of vLLM's -1 placeholders, and
the optimistic num_computed_tokens vLLM sends before it has seen a step's accepted count,
step by step as vLLM's AsyncScheduler would send them (the whole path through vllm.LLM:
tests/e2e/test_llm_spec_async.py)."""

import pytest

from xla_inference.runner.requests import RequestState

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # imports vLLM


def _runner():
    from xla_inference.plugin.model_runner import XlaModelRunner

    runner = XlaModelRunner.__new__(XlaModelRunner)  # only the draft bookkeeping is used
    runner._proposed, runner._unseen_rejections = {}, {}
    return runner


def _request(num_tokens=10, computed=9):
    return RequestState("r", list(range(num_tokens)), 4, [[1]], computed)


def test_placeholders_take_the_runners_own_drafts_cut_or_padded():
    runner, req = _runner(), _request()
    assert runner._step_drafts(req, [5, 6]) == [5, 6]  # synchronous: vLLM's copy
    assert runner._step_drafts(req, []) == []
    runner._proposed = {"r": [7, 8, 9]}
    assert runner._step_drafts(req, [-1, -1]) == [7, 8]
    assert runner._step_drafts(req, [-1, -1, -1, -1]) == [7, 8, 9, 9]
    runner._proposed = {}  # nothing proposed: any token is a valid draft
    assert runner._step_drafts(req, [-1, -1]) == [9, 9]


def test_rejections_are_subtracted_only_while_vllm_has_not_seen_them():
    """A step verified 3 placeholder drafts from computed 9 (4 tokens: 13 assumed), 1
    accepted: true count 11, 2 rejected."""
    runner = _runner()
    runner._unseen_rejections = {"r": (13, 2)}
    req = _request(computed=13)  # vLLM scheduled the next step before seeing the output
    runner._correct_optimistic_count(req, 13)
    assert req.num_computed_tokens == 11
    assert "r" not in runner._unseen_rejections
    runner._unseen_rejections = {"r": (13, 2)}
    req = _request(computed=11)  # vLLM saw the output first (a step without the request)
    runner._correct_optimistic_count(req, 11)
    assert req.num_computed_tokens == 11
