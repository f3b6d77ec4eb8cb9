"""The model runner's side of vLLM's async scheduling with speculative decoding
(plugin/model_runner.py): the drafts a step verifies in place of vLLM's -1 placeholders, and
the optimistic num_computed_tokens vLLM sends before it has seen a step's accepted count,
step by step as vLLM's AsyncScheduler would send them; and, with structured output, how
far the drafts are verified against the grammar bitmask vLLM's own Scheduler and
StructuredOutputManager build for them (the whole path through vllm.LLM:
tests/e2e/test_llm_spec_async.py, tests/e2e/test_llm_spec_async_grammar.py)."""

import types

import numpy as np
import pytest

from xla_inference.runner.engine import ModelEngine
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


# The whole step path (execute_model, then sample_tokens with vLLM's grammar output) on a
# stand-in engine: no model, but ModelEngine's own verify_drafts and rejection sampling.

V, K = 128, 3
EVEN_WORDS = np.full(V // 32, 0x55555555, np.int32)  # bit t set for every even token t


def _ranked_logits(preferred):
    """Logits preferring the tokens of `preferred` in its order, every other far below."""
    logits = np.full(V, -100.0, np.float32)
    logits[list(preferred)] = -np.arange(len(preferred), dtype=np.float32)
    return logits


class PositionEngine:
    """A ModelEngine without a model: the logits at a request's position p are
    _ranked_logits(prefer(req_id, p)), whatever the tokens (a step's hidden states are its
    logits); verify_drafts is ModelEngine's own. Records each forward's (request, first
    position, tokens)."""

    replicas = microbatches = 1
    vocab_size = V
    lora = None
    blocks_per_replica = 1 << 20
    params = None

    def __init__(self, prefer):
        import jax

        from xla_inference.runner.speculative import rejection_step

        self.prefer, self.forwards, self._num_steps = prefer, [], 0
        self.cfg = types.SimpleNamespace(num_groups=1)
        self.stats = types.SimpleNamespace(idle=lambda: None, step_started=lambda: None,
                                           run=lambda program, *args: program(*args))
        self._base_key = jax.random.key(0)
        self._rejection = jax.jit(rejection_step)

    verify_drafts = ModelEngine.verify_drafts
    head_lora = False  # no LoRA: verify's logits take the plain params, no row slots
    _lora_slots = ModelEngine._lora_slots
    _head_params = ModelEngine._head_params

    def free_encoder_outputs(self, hashes):
        pass

    def _verify_slots(self, num_requests):
        return num_requests

    def _draft_rows_logits(self, params, hidden, rows):
        return hidden[rows]

    def forward(self, scheduled, fed=None, sample=False):
        # nothing feeds tokens here, nor samples in the step: async overlap is off with drafts
        assert fed is None and not sample
        logits = []
        for req, n in scheduled:
            first = req.num_computed_tokens
            self.forwards.append((req.req_id, first, req.token_ids[first:first + n]))
            logits += [_ranked_logits(self.prefer(req.req_id, p)) for p in range(first, first + n)]
        return types.SimpleNamespace(hidden=np.stack(logits), logits=None)


class ScriptedDrafter:
    """Proposes, at each call, the next {request: drafts} of its script."""

    num_speculative_tokens = K

    def __init__(self, script):
        self.script = list(script)

    def start_step(self, requests):
        pass

    def forget(self, req_id):
        pass

    def propose(self, requests, sampled):
        from vllm.v1.outputs import DraftTokenIds

        drafts = self.script.pop(0)
        assert set(drafts) == {r.req_id for r in requests}
        return DraftTokenIds([r.req_id for r in requests],
                             [list(drafts[r.req_id]) for r in requests])


def _placeholder_step(vllm_counts: dict, structured=False):
    """vLLM's AsyncScheduler's SchedulerOutput of a decode step: each cached request with
    the num_computed_tokens vLLM sends, 1 + K tokens, K -1 placeholders."""
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

    ids = list(vllm_counts)
    cached = CachedRequestData(req_ids=ids, resumed_req_ids=set(), new_token_ids=[],
                               all_token_ids={}, new_block_ids=[None] * len(ids),
                               num_computed_tokens=list(vllm_counts.values()),
                               num_output_tokens=[1000] * len(ids))  # counts placeholders
    return SchedulerOutput(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                           num_scheduled_tokens={rid: 1 + K for rid in ids},
                           total_num_scheduled_tokens=(1 + K) * len(ids),
                           scheduled_spec_decode_tokens={rid: [-1] * K for rid in ids},
                           scheduled_encoder_inputs={}, finished_req_ids=set(),
                           free_encoder_mm_hashes=[], has_structured_output_requests=structured,
                           num_spec_tokens_to_schedule=K)


def _decoding(rid, last_token):
    """A request whose prompt [1, 3] is computed and whose first sampled token is not."""
    return RequestState(rid, [1, 3, last_token], 2, [[1]], 2)


def test_rejections_of_two_pipelined_placeholder_steps_are_subtracted_as_vllm_lags():
    """Steps 1 and 2 are scheduled before step 1's output, step 3 after step 1's but before
    step 2's, step 4 after both: vLLM's counts are those of its AsyncScheduler (+1 + K per
    step scheduled, - the rejections of each step it has seen). The target's greedy tokens
    after position p: 10 + 2 (p - 2); each step starts where the true count says."""
    from xla_inference.plugin.model_runner import XlaModelRunner

    engine = PositionEngine(lambda rid, p: [10 + 2 * (p - 2)])
    drafter = ScriptedDrafter([{"r": [10, 99, 99]}, {"r": [14, 16, 99]}, {"r": [20, 99, 99]},
                               {"r": [24, 26, 28]}, {"r": [32, 34, 36]}])
    runner = XlaModelRunner(engine, drafter=drafter)
    req = runner.requests["r"] = _decoding("r", 4)
    runner._propose([req], [[4]])  # the drafts proposed after its first token

    def step(vllm_count):
        assert runner.execute_model(_placeholder_step({"r": vllm_count})) is None
        return runner.sample_tokens(None).sampled_token_ids[0]

    # vLLM: 2 computed, + 4 (step 1) -> 6, + 4 (step 2) -> 10, - 2 (step 1's) -> 8
    assert step(2) == [10, 12]  # 1 of 3 accepted: 4 computed
    assert step(6) == [14, 16, 18]  # vLLM assumed 6; 2 accepted: 7 computed
    assert step(8) == [20, 22]  # vLLM saw step 1's rejections, not step 2's
    # vLLM: + 4 (step 3) -> 12, - 1 (step 2's), - 2 (step 3's) -> 9: caught up
    assert step(9) == [24, 26, 28, 30]
    assert [first for _, first, _ in engine.forwards] == [2, 4, 7, 9]
    assert engine.forwards[2][2] == [18, 20, 99, 99]
    assert req.token_ids == [1, 3, 4, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30]
    assert req.num_computed_tokens == 13


def test_a_request_left_out_of_a_step_keeps_its_drafts_until_it_finishes():
    """vLLM gives a request placeholders when it schedules it, for its next step, which may
    come after steps without it: its drafts are those proposed after its own last step."""
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

    from xla_inference.plugin.model_runner import XlaModelRunner

    drafter = ScriptedDrafter([{"r": [5, 6, 7], "o": [8, 9, 10]}, {"o": [11, 12, 13]}])
    runner = XlaModelRunner(PositionEngine(None), drafter=drafter)
    r, o = _decoding("r", 4), _decoding("o", 4)
    runner.requests.update(r=r, o=o)
    runner._propose([r, o], [[4], [4]])
    runner._propose([o], [[4]])  # a step without r
    assert runner._step_drafts(r, [-1] * K) == [5, 6, 7]
    assert runner._step_drafts(o, [-1] * K) == [11, 12, 13]
    runner._update_states(SchedulerOutput(
        scheduled_new_reqs=[], scheduled_cached_reqs=CachedRequestData.make_empty(),
        num_scheduled_tokens={}, total_num_scheduled_tokens=0, scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={}, finished_req_ids={"r"}, free_encoder_mm_hashes=[]))
    assert set(runner._proposed) == {"o"}


class EvenTokens:
    """A grammar (vLLM's StructuredOutputGrammar interface) that allows even tokens only."""

    def accept_tokens(self, request_id, tokens):
        return all(t % 2 == 0 for t in tokens)

    def validate_tokens(self, tokens):
        odd = [i for i, t in enumerate(tokens) if t % 2]
        return tokens[:odd[0]] if odd else list(tokens)

    def rollback(self, num_tokens):
        pass

    def is_terminated(self):
        return False

    def fill_bitmask(self, bitmask, index):
        import torch

        bitmask[index] = torch.from_numpy(EVEN_WORDS)


def _vllm_grammar_side(structured: dict):
    """vLLM's Scheduler and StructuredOutputManager, with only what their draft validation
    and grammar bitmask need: {request id: uses the EvenTokens grammar}."""
    import torch
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    manager = StructuredOutputManager.__new__(StructuredOutputManager)
    manager.vllm_config = types.SimpleNamespace(
        num_speculative_tokens=K, scheduler_config=types.SimpleNamespace(max_num_seqs=8),
        model_config=types.SimpleNamespace(is_diffusion=False))
    manager.backend = types.SimpleNamespace(allocate_token_bitmask=lambda n: torch.full(
        (n, V // 32), -1, dtype=torch.int32))
    manager._grammar_bitmask, manager._full_mask = None, torch.tensor(-1, dtype=torch.int32)
    manager.fill_bitmask_parallel_threshold = 128
    manager.enable_in_reasoning = True  # no reasoning parser: constrained from the start
    scheduler = Scheduler.__new__(Scheduler)
    scheduler.structured_output_manager = manager
    scheduler.requests = {rid: types.SimpleNamespace(
        use_structured_output=grammar, is_prefill_chunk=False, is_finished=lambda: False,
        structured_output_request=types.SimpleNamespace(grammar=EvenTokens()) if grammar else None)
        for rid, grammar in structured.items()}
    return scheduler


PREFER = {  # the target's preferred tokens after each position of each request
    ("r", 2): [6], ("r", 3): [6, 8], ("r", 4): [7, 8],
    ("s", 2): [10], ("s", 3): [11, 12],
    ("u", 2): [14], ("u", 3): [15, 16],
    ("plain", 2): [5], ("plain", 3): [7], ("plain", 4): [9], ("plain", 5): [11],
}


def _greedy_under_grammar(rid, first, n, structured):
    """The reference: the target's greedy tokens alone, masked by the grammar, no drafts."""
    allowed = (lambda t: t % 2 == 0) if structured else (lambda t: True)
    return [next(t for t in PREFER.get((rid, p), [0]) + list(range(V)) if allowed(t))
            for p in range(first, first + n)]


def test_async_drafts_are_accepted_only_as_far_as_vllms_grammar_bitmask_constrains():
    """Under async scheduling vLLM validates the drafts it takes from the runner and builds
    the bitmask for them, padded with -1 where it stopped; the rows past the first -1 allow
    every token. r: the drafter proposed 1 token for 3 placeholders (vLLM: [6, -1, -1]; the
    runner pads with 6, which row 2 would follow with the odd 7); s: the grammar rejects
    the draft 11 (vLLM: [10, -1, -1]); u: left out of the step whose drafts vLLM took (vLLM:
    all -1; the runner verifies its own earlier [14, 14, 14]); plain: no grammar, every
    draft accepted. vLLM's own Scheduler and StructuredOutputManager build the bitmask
    with a grammar of even tokens; each request emits a prefix of the target's greedy
    tokens under the grammar."""
    from xla_inference.plugin.model_runner import XlaModelRunner

    structured = {"r": True, "u": True, "s": True, "plain": False}
    engine = PositionEngine(lambda rid, p: PREFER.get((rid, p), [0]))
    drafter = ScriptedDrafter([{"u": [14, 14, 14]},
                               {"r": [6], "s": [10, 11, 12], "plain": [5, 7, 9]},
                               {rid: [0] * K for rid in structured}])  # after the step
    runner = XlaModelRunner(engine, drafter=drafter)
    last = {"r": 4, "u": 12, "s": 8, "plain": 3}
    for rid in structured:
        runner.requests[rid] = _decoding(rid, last[rid])
    runner._propose([runner.requests["u"]], [[12]])
    runner._propose([runner.requests[rid] for rid in ("r", "s", "plain")], [[4], [8], [3]])
    scheduler = _vllm_grammar_side(structured)

    so = _placeholder_step({rid: 2 for rid in structured}, structured=True)
    assert runner.execute_model(so) is None
    # vLLM's engine core (step_with_batch_queue, the deferred sample of a step whose
    # structured requests wait on the last step's tokens):
    scheduler.update_draft_token_ids_in_output(runner.take_draft_token_ids(), so)
    assert so.scheduled_spec_decode_tokens == {"r": [6, -1, -1], "u": [-1, -1, -1],
                                               "s": [10, -1, -1], "plain": [5, 7, 9]}
    grammar = scheduler.get_grammar_bitmask(so)
    assert grammar.structured_output_request_ids == ["r", "u", "s"]
    assert grammar.num_acceptable_drafts == [1, 0, 1]
    out = runner.sample_tokens(grammar)

    emitted = dict(zip(out.req_ids, out.sampled_token_ids))
    assert emitted == {"r": [6, 6], "u": [14], "s": [10, 12], "plain": [5, 7, 9, 11]}
    for rid, tokens in emitted.items():
        assert tokens == _greedy_under_grammar(rid, 2, len(tokens), structured[rid])
    # Without the limit the runner would have accepted r's 6 at row 1 and u's 14 at row 0,
    # then taken the target's 7 and 15 from rows that allow every token.
    assert [first for _, first, _ in engine.forwards] == [2, 2, 2, 2]
