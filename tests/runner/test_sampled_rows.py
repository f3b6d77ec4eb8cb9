"""A step samples as many logits rows as the fewest compiled row count that holds its
requests, not its bucket's rows (ModelEngine._rows_to_sample): a one-request prefill in a
bucket of max_num_seqs rows samples one row. The tokens are those of sampling every row,
and the slice was compiled at warm-up (no program built while serving)."""

import numpy as np
import pytest

from tests.helpers import ENGINE_BLOCK, save_tiny_llama
from xla_inference.runner import compile_counter
from xla_inference.runner.build import Precision, build_engine, load
from xla_inference.runner.engine import EngineConfig
from xla_inference.runner.requests import RequestState


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = save_tiny_llama(tmp_path_factory.mktemp("rows") / "llama")
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=32,
                        max_num_seqs=4, max_model_len=128)
    engine = build_engine(load(model_dir, Precision.uniform(np.float32)), ecfg)
    compile_counter.install()
    engine.warm_up()
    return engine


def _requests(count: int, prompt_len: int):
    rng = np.random.default_rng(count)
    return [RequestState(f"r{i}", rng.integers(3, 128, prompt_len).tolist(), prompt_len,
                         [list(range(1 + 16 * i, 17 + 16 * i))], 0) for i in range(count)]


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
