"""Pooling on the engine (no vLLM): tiny random Qwen3 embedder and Llama classifier, mixed
prompt lengths, one prompt over several chunks; each pooled output against transformers'
hidden states (float64), for LAST / MEAN / CLS / ALL, Matryoshka dimensions,
use_activation, the classification head; LAST over a prefix from the cache; MEAN refused
there."""

import types

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import ENGINE_BLOCK, engine_request
from tests.pooling_models import (hf_classify_logits, hf_last_hidden, normalized,
                                  save_tiny_llama_classifier, save_tiny_qwen3_embedder)
from xla_inference.plugin.pooling import PoolingRequests, PoolingSetup
from xla_inference.runner.build import Precision, build_engine, load_pooling
from xla_inference.runner.engine import EngineConfig

PROMPTS = [[5, 9, 3, 7, 11], list(range(3, 26)), [40, 41, 42, 8, 9, 10, 99, 1, 4]]
# Prompt 1 (23 tokens) runs over three steps of at most 16 tokens.
PLAN = [{0: 5, 1: 11}, {1: 8, 2: 8}, {1: 4, 2: 1}]
TOL = 1e-4

# Two engines compiled, two transformers models: ~2 minutes on the shared 2-core machine.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    path = save_tiny_qwen3_embedder(tmp_path_factory.mktemp("qwen3emb"))
    return path, _engine(path), hf_last_hidden(path, PROMPTS)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    path = save_tiny_llama_classifier(tmp_path_factory.mktemp("llamacls"))
    return path, _engine(path), hf_classify_logits(path, PROMPTS)


def _engine(path):
    f32 = jnp.dtype(jnp.float32)
    model = load_pooling(path, Precision(f32, f32, f32))
    cfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=16,
                       max_num_seqs=8, max_model_len=128)
    return model, build_engine(model, cfg, pooling=True)


def _params(task="embed", dimensions=None, use_activation=None):
    return types.SimpleNamespace(task=task, dimensions=dimensions, use_activation=use_activation)


def _run(engine, setup, params_of, plan=PLAN, prompts=PROMPTS, computed=None):
    """Drive the engine through `plan`; -> {request index: pooled output}; a None output
    is allowed only before the prompt's last chunk."""
    pooling = PoolingRequests(setup)
    reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(prompts)]
    for i, req in enumerate(reqs):
        req.num_computed_tokens = (computed or {}).get(i, 0)
        pooling.add(req.req_id, params_of(i), len(req.token_ids))
    done = {}
    for step in plan:
        scheduled = [(reqs[i], n) for i, n in step.items()]
        out = engine.forward(scheduled)
        pooled = pooling.step_outputs(scheduled, out.logits, out.hidden)
        for (req, n), vec in zip(scheduled, pooled):
            req.num_computed_tokens += n
            finished = req.num_computed_tokens == len(req.token_ids)
            assert (vec is not None) == finished
            if finished:
                done[int(req.req_id[1:])] = vec.numpy()
    return done


@pytest.mark.parametrize("kind", ["LAST", "MEAN", "CLS"])
def test_sequence_pooling_matches_transformers(embedder, kind):
    _, (_, engine), hidden = embedder
    got = _run(engine, PoolingSetup(kind), lambda i: _params())
    pool = {"LAST": lambda h: h[-1], "MEAN": lambda h: h.mean(0), "CLS": lambda h: h[0]}[kind]
    for i, h in enumerate(hidden):
        np.testing.assert_allclose(got[i], normalized(pool(h)), atol=TOL, rtol=TOL)


def test_dimensions_and_no_activation(embedder):
    _, (_, engine), hidden = embedder
    got = _run(engine, PoolingSetup("LAST"),
               lambda i: _params(dimensions=16 if i != 1 else None, use_activation=i == 0))
    np.testing.assert_allclose(got[0], normalized(hidden[0][-1][:16]), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(got[1], hidden[1][-1], atol=TOL, rtol=TOL)  # raw, every dim
    np.testing.assert_allclose(got[2], hidden[2][-1][:16], atol=TOL, rtol=TOL)


def test_token_embed_all_pooling(embedder):
    _, (_, engine), hidden = embedder
    got = _run(engine, PoolingSetup("LAST"), lambda i: _params("token_embed"))
    for i, h in enumerate(hidden):
        assert got[i].shape == h.shape
        np.testing.assert_allclose(got[i], normalized(h), atol=TOL, rtol=TOL)


def test_last_pooling_over_a_cached_prefix(embedder):
    """Prompt 1's first 12 tokens are in the cache (computed by an earlier request on the
    same pages): the rest alone pools to the whole prompt's LAST state; MEAN refuses."""
    _, (_, engine), hidden = embedder
    _run(engine, PoolingSetup("LAST"), lambda i: _params(), plan=[{1: 12}],
         prompts=[PROMPTS[0], PROMPTS[1][:12]])
    got = _run(engine, PoolingSetup("LAST"), lambda i: _params(), plan=[{1: 11}],
               prompts=PROMPTS[:2], computed={1: 12})
    np.testing.assert_allclose(got[1], normalized(hidden[1][-1]), atol=TOL, rtol=TOL)
    with pytest.raises(ValueError, match="prefix cache"):
        _run(engine, PoolingSetup("MEAN"), lambda i: _params(), plan=[{1: 11}],
             prompts=PROMPTS[:2], computed={1: 12})


def test_classification_head_matches_transformers(classifier):
    _, (model, engine), logits = classifier
    assert model.score_weight.shape == (3, 64)
    setup = PoolingSetup("LAST", model.score_weight, "softmax")
    got = _run(engine, setup, lambda i: _params("classify", use_activation=i != 2))
    for i, z in enumerate(logits):
        want = z if i == 2 else np.exp(z) / np.exp(z).sum()
        np.testing.assert_allclose(got[i], want, atol=TOL, rtol=TOL)
