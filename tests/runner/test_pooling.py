"""Pooling on the engine (no vLLM): tiny random Qwen3 embedder and Llama classifier, mixed
prompt lengths, one prompt over several chunks; each pooled output against transformers'
hidden states (float64), for LAST / MEAN / CLS / ALL / STEP, Matryoshka dimensions,
use_activation, the classification head; LAST over a prefix from the cache; MEAN refused
there."""

import types

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import ENGINE_BLOCK, engine_request
from tests.pooling_models import (hf_classify_logits, hf_last_hidden, hf_token_logits,
                                  normalized, save_tiny_llama_classifier,
                                  save_tiny_qwen3_embedder)
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


def _params(task="embed", dimensions=None, use_activation=None, step_tag_id=None,
            returned_token_ids=None):
    return types.SimpleNamespace(task=task, dimensions=dimensions, use_activation=use_activation,
                                 step_tag_id=step_tag_id, returned_token_ids=returned_token_ids)


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


# STEP (process reward models): per request, the step tag and the columns kept. Prompt 1's
# tag (22, position 19) is in its third chunk; prompt 2 keeps columns 5 and 0, raw.
STEP_PARAMS = [dict(step_tag_id=9), dict(step_tag_id=22, returned_token_ids=[3, 17, 40]),
               dict(step_tag_id=4, returned_token_ids=[5, 0], use_activation=False)]


def _step_rows(prompt, params, h):
    """The reference selection: rows at the step tag, then the kept columns."""
    rows = h[[i for i, t in enumerate(prompt) if t == params["step_tag_id"]]]
    return rows[:, params["returned_token_ids"]] if "returned_token_ids" in params else rows


def test_token_embed_step_pooling(embedder):
    _, (_, engine), hidden = embedder
    got = _run(engine, PoolingSetup("LAST", tok_pooling_type="STEP"),
               lambda i: _params("token_embed", **STEP_PARAMS[i]))
    assert [got[i].shape for i in range(3)] == [(1, 64), (1, 3), (1, 2)]
    for i, h in enumerate(hidden):
        want = _step_rows(PROMPTS[i], STEP_PARAMS[i], h)
        want = want if i == 2 else normalized(want)
        np.testing.assert_allclose(got[i], want, atol=TOL, rtol=TOL)
    # No step tag: every token's state, as ALL pools (and the columns still kept).
    got = _run(engine, PoolingSetup("LAST", tok_pooling_type="STEP"),
               lambda i: _params("token_embed", returned_token_ids=[7, 1] if i else None))
    np.testing.assert_allclose(got[0], normalized(hidden[0]), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(got[1], normalized(hidden[1][:, [7, 1]]), atol=TOL, rtol=TOL)


def test_token_classify_step_pooling(classifier):
    """Every label's probability at the step tokens (prompt 0 twice: 9 at 1 and 3 at 2):
    transformers' per-token scores (its score layer over each token's state)."""
    path, (model, engine), _ = classifier
    prompts = [[5, 9, 3, 7, 3, 11], PROMPTS[1]]
    setup = PoolingSetup("LAST", model.score_weight, "softmax", tok_pooling_type="STEP")
    got = _run(engine, setup, lambda i: _params("token_classify", step_tag_id=(3, 19)[i]),
               plan=[{0: 6, 1: 10}, {1: 13}], prompts=prompts)
    for i, z in enumerate(hf_token_logits(path, prompts)):
        rows = z[np.asarray(prompts[i]) == (3, 19)[i]]
        assert got[i].shape == (2 - i, 3)
        np.testing.assert_allclose(got[i], np.exp(rows) / np.exp(rows).sum(-1, keepdims=True),
                                   atol=TOL, rtol=TOL)
    # vLLM would take returned_token_ids as columns of the hidden state, before the score
    # layer, which then no longer fits it: refused by name.
    with pytest.raises(ValueError, match="returned_token_ids"):
        PoolingRequests(setup).add("r0", _params("token_classify", step_tag_id=3,
                                                 returned_token_ids=[0]), 6)

