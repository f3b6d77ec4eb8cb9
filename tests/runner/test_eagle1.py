"""The EAGLE-1 head (models/eagle1.py) through the drafting loop (spec_decode/eagle.py) against
a float64 numpy reference of the same head given the same target hidden states, over a
prompt step and a verify step with partly accepted drafts."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from tests.drafter_checks import assert_drafts_match_over_a_prompt_and_a_verify_step
from tests.eagle1_checkpoint import NumpyEagle1, save_tiny_eagle1
from tests.eagle3_checkpoint import HIDDEN, VOCAB
from tests.helpers import ENGINE_BLOCK
from xla_inference.loading.safetensors import CheckpointTensors, safetensors_files
from xla_inference.models import eagle1
from xla_inference.parallel.sharding import build_mesh
from xla_inference.runner.buckets import token_buckets
from xla_inference.spec_decode.eagle import EagleLimits, EagleProposer

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
    assert_drafts_match_over_a_prompt_and_a_verify_step(
        proposer, ref, k=K, hidden_size=HIDDEN, vocab=VOCAB, rows=16, rng=rng)
