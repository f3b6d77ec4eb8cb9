"""The EAGLE-1 head (models/eagle1.py) through the drafting loop (runner/eagle.py) against
a float64 numpy reference of the same head given the same target hidden states, over a
prompt step and a verify step with partly accepted drafts."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from tests.eagle1_checkpoint import NumpyEagle1, save_tiny_eagle1
from tests.eagle3_checkpoint import HIDDEN, VOCAB
from tests.helpers import ENGINE_BLOCK
from xla_inference.loading.safetensors import CheckpointTensors, safetensors_files
from xla_inference.models import eagle1
from xla_inference.parallel.sharding import build_mesh
from xla_inference.runner.buckets import token_buckets
from xla_inference.runner.eagle import EagleLimits, EagleProposer
from xla_inference.runner.requests import RequestState

K = 3


def test_proposals_match_a_float64_reference_over_a_prompt_and_a_verify_step(tmp_path):
    path = save_tiny_eagle1(tmp_path / "head")
    cfg = eagle1.Eagle1Config.from_hf(json.loads((path / "config.json").read_text()))
    params = eagle1.load_params(CheckpointTensors(safetensors_files(path)), cfg, jnp.float32)
    rng = np.random.default_rng(4)
    embed = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    lm_head = (rng.standard_normal((VOCAB, HIDDEN)) / 8).astype(np.float32)
    assert params.embed is None and len(params.layers) == 2
    params = dataclasses.replace(params, embed=embed, lm_head=jax.device_put(lm_head))
    limits = EagleLimits(token_buckets=tuple(token_buckets(16)), max_num_seqs=4,
                         max_model_len=64, block_size=ENGINE_BLOCK, num_slots=64 * ENGINE_BLOCK,
                         groups=(0,), num_speculative_tokens=K)
    proposer = EagleProposer(eagle1, params, cfg, limits, build_mesh(), jnp.float32)
    ref = NumpyEagle1(path, embed.astype(np.float64), lm_head.astype(np.float64))
    true_hidden = {}

    def hidden_at(rid, p):
        return true_hidden.setdefault((rid, p), rng.standard_normal(HIDDEN).astype(np.float32))

    def step(scheduled, kept):
        hidden = rng.standard_normal((16, HIDDEN)).astype(np.float32)
        row = 0
        for (req, n), keep in zip(scheduled, kept):
            for j in range(keep):
                hidden[row + j] = hidden_at(req.req_id, req.num_computed_tokens + j)
            row += n
        proposer.saw_target_step(scheduled, jax.device_put(hidden))

    def reference(req):
        N = len(req.token_ids)
        h = np.stack([hidden_at(req.req_id, p) for p in range(N - 1)]).astype(np.float64)
        return ref.propose(req.token_ids, h, K)

    reqs = [RequestState(f"r{i}", rng.integers(3, VOCAB, n).tolist(), n,
                         [list(range(1 + 16 * i, 17 + 16 * i))], 0)
            for i, n in enumerate((3, 6, 9))]
    scheduled = [(reqs[0], 3), (reqs[1], 6), (reqs[2], 5)]  # the last prompt in two chunks
    step(scheduled, [3, 6, 5])
    for req, n in scheduled:
        req.num_computed_tokens += n
        if req.num_computed_tokens == len(req.token_ids):
            req.token_ids.append(int(rng.integers(3, VOCAB)))
    drafts = proposer.propose(reqs, [[1], [1], []])
    assert drafts[2] == []
    assert drafts[:2] == [reference(r) for r in reqs[:2]]

    scheduled = [(reqs[0], 1 + K), (reqs[1], 1 + K), (reqs[2], 4)]
    step(scheduled, [2, 1, 4])  # one draft accepted; none; the prompt's end
    emitted = [drafts[0][:1] + [int(rng.integers(3, VOCAB))], [int(rng.integers(3, VOCAB))],
               [int(rng.integers(3, VOCAB))]]
    for (req, n), out in zip(scheduled, emitted):
        req.num_computed_tokens += len(out) if req is not reqs[2] else n
        req.token_ids.extend(out)
    drafts = proposer.propose(reqs, [[1]] * 3)
    assert all(len(d) == K for d in drafts)
    assert drafts == [reference(r) for r in reqs]
