"""vLLM's PyTorch model classes lowered through torchax (torch_models/) against
transformers' own implementations: logits of every position of a ragged batch that mixes
prefill chunks and decode steps, for architectures xla-inference has no native code for."""

import numpy as np
import pytest

from tests.helpers import assert_ragged_logits, hf_logits
from tests.torch_models.conftest import torch_engine

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

# Step 1: two prompts' first chunks; step 2: a long chunk, a decode-sized step, a whole
# new prompt; all three go on reading the pages written before.
PLAN = [{0: 5, 1: 6}, {0: 8, 1: 1, 2: 9}]


@pytest.mark.parametrize("name", ["phi3", "granite", "cohere", "stablelm"])
def test_ragged_logits_match_transformers(tiny_architecture, name):
    model_dir = tiny_architecture(name)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 128, n).tolist() for n in (13, 7, 9)]
    expected = [hf_logits(model_dir, p) for p in prompts]  # before vLLM's classes load
    assert_ragged_logits(torch_engine(model_dir), prompts, expected, PLAN, 2e-4)
