"""A step samples as many logits rows as the fewest compiled row count that holds its
requests, not its bucket's rows (ModelEngine._rows_to_sample): a one-request prefill in a
bucket of max_num_seqs rows samples one row. The tokens are those of sampling every row,
and the slice was compiled at warm-up (no program built while serving).

A greedy step whose tokens stay on device draws them in its own program
(ModelEngine.forward with sample=True: runner/engine._forward_argmax): the tokens the
sampler takes from the same logits (sample_on_device), the step number it would have
taken, the logits unchanged, nothing compiled after warm-up, the feed of its tokens into
the next step included. A step with a random row, or whose logits rows are more than it
samples, leaves its tokens to the sampler."""

import jax
import numpy as np
import pytest

from tests.helpers import ENGINE_BLOCK, save_tiny_llama
from xla_inference.runner import compile_counter
from xla_inference.runner.build import Precision, build_engine, load
from xla_inference.runner.engine import EngineConfig
from xla_inference.runner.requests import RequestState
from xla_inference.sampling.host import SamplingOptions

GREEDY = SamplingOptions()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = save_tiny_llama(tmp_path_factory.mktemp("rows") / "llama")
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=32,
                        max_num_seqs=4, max_model_len=128)
    engine = build_engine(load(model_dir, Precision.uniform(np.float32)), ecfg)
    engine.feeds_tokens = True  # (warm-up then compiles the feed of on-device tokens)
    compile_counter.install()
    engine.warm_up()
    return engine


def _requests_with(options, prompt_len: int, seed: int):
    rng = np.random.default_rng(seed)
    return [RequestState(f"r{i}", rng.integers(3, 128, prompt_len).tolist(), prompt_len,
                         [list(range(1 + 4 * i, 5 + 4 * i))], 0, opts)
            for i, opts in enumerate(options)]


def _requests(count: int, prompt_len: int):
    return _requests_with([GREEDY] * count, prompt_len, count)


@pytest.mark.parametrize("count, prompt_len, rows", [(1, 9, 1), (2, 5, 2), (3, 3, 4)])
def test_step_samples_its_requests_rows(engine, count, prompt_len, rows):
    requests = _requests(count, prompt_len)
    step = engine.forward([(r, prompt_len) for r in requests])
    assert step.logits.shape[0] == 4  # the bucket's rows: max_num_seqs
    before = compile_counter.num_compilations()
    tokens = engine.sample_on_device(step.logits, requests)
    assert compile_counter.num_compilations() == before  # compiled at warm-up
    assert tokens.shape == (rows,)
    every_row = engine.sample(step.logits, requests)  # the bucket's rows, on the host
    assert np.asarray(tokens)[:count].tolist() == every_row.tokens.tolist()


def _sampled_apart(engine, logits, requests):
    """The sampler's tokens from the step's logits, at the step number the step took."""
    engine._num_steps -= 1
    return np.asarray(engine.sample_on_device(logits, requests)).tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_greedy_step_draws_the_samplers_tokens(engine, seed):
    requests = _requests_with([GREEDY] * 4, 5, seed)
    assert engine.argmax_in_forward
    before, steps = compile_counter.num_compilations(), engine._num_steps
    step = engine.forward([(r, 5) for r in requests], sample=True)
    assert step.tokens is not None and step.tokens.shape == (4,)
    assert engine._num_steps == steps + 1
    tokens = np.asarray(step.tokens).tolist()
    assert tokens == _sampled_apart(engine, step.logits, requests)
    # The next step, fed those tokens on device (placeholders in the host's ids), draws again.
    for r in requests:
        r.num_computed_tokens = 5
        r.token_ids.append(-1)
    step2 = engine.forward([(r, 1) for r in requests], (step.tokens, [0, 1, 2, 3]), sample=True)
    for r, t in zip(requests, tokens):
        r.token_ids[-1] = t
    plain = engine.forward([(r, 1) for r in requests])  # the same step from host tokens
    assert plain.tokens is None
    np.testing.assert_array_equal(np.asarray(step2.logits), np.asarray(plain.logits))
    assert np.asarray(step2.tokens).tolist() == _sampled_apart(engine, step2.logits, requests)
    assert compile_counter.num_compilations() == before


@pytest.mark.parametrize("options, prompt_len", [
    ([GREEDY, SamplingOptions(temperature=0.8, seed=3), GREEDY, GREEDY], 5),  # a random row
    ([GREEDY], 9),  # one request, a bucket of 4 rows
])
def test_other_steps_leave_their_tokens_to_the_sampler(engine, options, prompt_len):
    requests = _requests_with(options, prompt_len, 5)
    steps = engine._num_steps
    step = engine.forward([(r, prompt_len) for r in requests], sample=True)
    assert step.logits.shape[0] == 4 and step.tokens is None
    assert engine._num_steps == steps  # no step number taken
    jax.block_until_ready(engine.sample_on_device(step.logits, requests))
