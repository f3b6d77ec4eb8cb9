"""A step fed the last step's tokens on device (ModelEngine.forward's `fed`, async
scheduling's overlap: plugin/async_output.py) against the same step built from host tokens,
on two engines over one tiny Llama: the same sampled tokens and bit-identical logits, step
after step, with a prompt chunk that takes nothing fed in the same steps."""

import jax
import numpy as np
import pytest

from tests.helpers import ENGINE_BLOCK, save_tiny_llama
from xla_inference.runner.build import Precision, build_engine, load
from xla_inference.runner.engine import EngineConfig
from xla_inference.runner.requests import RequestState

PLACEHOLDER = -1  # plugin/async_output.PLACEHOLDER (plugin/ imports vLLM; this test does not)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    model_dir = save_tiny_llama(tmp_path_factory.mktemp("fed") / "llama")
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=32,
                        max_num_seqs=4, max_model_len=128)
    return [build_engine(load(model_dir, Precision.uniform(np.float32)), ecfg) for _ in range(2)]


def _requests(first_page: int):
    """A request past its prompt, and one whose 20-token prompt comes in chunks of 5."""
    rng = np.random.default_rng(3)
    decode = RequestState("d", rng.integers(3, 128, 9).tolist(), 9,
                          [list(range(first_page, first_page + 16))], 0)
    chunked = RequestState("c", rng.integers(3, 128, 20).tolist(), 20,
                           [list(range(first_page + 16, first_page + 32))], 0)
    return decode, chunked


def test_fed_steps_equal_host_built_steps(engines):
    host_engine, fed_engine = engines
    assert fed_engine.can_feed_tokens
    host_reqs, fed_reqs = _requests(1), _requests(1)
    tokens, slots = None, []  # the fed engine's last tokens on device, and their places
    for step in range(7):
        # the first prompt whole, then decode; the second prompt in 4 chunks, then decode
        plan = [9 if step == 0 else 1, 5 if step < 4 else 1]
        scheduled_host, scheduled_fed = list(zip(host_reqs, plan)), list(zip(fed_reqs, plan))
        fed = None
        if tokens is not None:
            fed = (tokens, [row if req.token_ids[-1] == PLACEHOLDER else -1
                            for row, (req, _) in enumerate(scheduled_fed)])
        step_host = host_engine.forward(scheduled_host)
        step_fed = fed_engine.forward(scheduled_fed, fed)
        if tokens is not None:  # vLLM takes the last step's output: the placeholders filled
            for req, row in slots:
                req.token_ids[-1] = int(np.asarray(tokens)[row])
        np.testing.assert_array_equal(np.asarray(step_fed.logits), np.asarray(step_host.logits))
        out = host_engine.sample(step_host.logits, host_reqs)
        tokens = fed_engine.sample_on_device(step_fed.logits, fed_reqs)
        assert np.asarray(tokens)[:2].tolist() == out.tokens.tolist()
        slots = []
        for row, ((host, n), (req, _)) in enumerate(zip(scheduled_host, scheduled_fed)):
            host.num_computed_tokens += n
            req.num_computed_tokens += n
            if host.num_computed_tokens >= len(host.token_ids):  # a chunk short of it: none
                host.token_ids.append(int(out.tokens[row]))
                req.token_ids.append(PLACEHOLDER)
                slots.append((req, row))
    assert [len(r.token_ids) for r in host_reqs] == [9 + 7, 20 + 4]
    for req, row in slots:
        req.token_ids[-1] = int(np.asarray(tokens)[row])
    assert [r.token_ids for r in fed_reqs] == [r.token_ids for r in host_reqs]


def test_a_placeholder_that_is_not_fed_is_refused(engines):
    _, fed_engine = engines
    req = RequestState("p", [5, 6, PLACEHOLDER], 2, [list(range(40, 44))], 2)
    tokens = jax.numpy.zeros(4, jax.numpy.int32)
    with pytest.raises(RuntimeError, match="placeholder"):
        fed_engine.forward([(req, 1)], (tokens, [-1]))


@pytest.mark.slow  # a whole warm-up (~30 s)
def test_feeding_on_a_tensor_parallel_mesh_compiles_nothing_after_warm_up(tmp_path):
    """The feed program is compiled at warm-up for the shardings the sampler's tokens have
    (a TP 2 mesh of virtual devices here), so fed steps build no program."""
    from xla_inference.runner import compile_counter

    model_dir = save_tiny_llama(tmp_path / "llama")
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=16,
                        max_num_seqs=4, max_model_len=64)
    engine = build_engine(load(model_dir, Precision.uniform(np.float32)), ecfg,
                          tensor_parallel_size=2)
    engine.feeds_tokens = True
    engine.warm_up()
    before = compile_counter.num_compilations()
    req = _requests(1)[0]
    tokens = engine.sample_on_device(engine.forward([(req, 9)]).logits, [req])
    req.num_computed_tokens = 9
    for _ in range(3):  # decode steps, each fed the last one's token
        req.token_ids.append(PLACEHOLDER)
        tokens = engine.sample_on_device(engine.forward([(req, 1)], (tokens, [0])).logits, [req])
        req.token_ids[-1] = 5  # resolved (any token: only compiles are counted here)
        req.num_computed_tokens += 1
    jax.block_until_ready(tokens)
    assert dict(engine.mesh.shape)["model"] == 2
    assert compile_counter.num_compilations() == before
