"""The real SmolLM2 (float32) served as an embedding model (--runner pooling --convert
embed: LAST pooling, normalized) through vllm.LLM on our platform: embeddings and the
cosine similarities of sentence pairs equal transformers' normalized last-token hidden
states."""

import numpy as np
import pytest

from tests.e2e.engines import shutdown, start_llm

pytestmark = pytest.mark.slow

SENTENCES = ["The cat sat on the mat.", "A cat was sitting on a rug.",
             "Stock markets fell sharply on Monday.", "Quarterly earnings beat expectations.",
             "How do I bake sourdough bread at home with a starter that I made myself?"]
PAIRS = [(0, 1), (0, 2), (2, 3), (1, 4)]


def test_smollm2_embeddings_match_transformers(smollm2_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [tok(s)["input_ids"] for s in SENTENCES]
    model = AutoModel.from_pretrained(smollm2_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = np.stack([model(input_ids=torch.tensor([p])).last_hidden_state[0, -1].double().numpy()
                         for p in prompts])
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    # 8 tokens a step: the longest sentence runs over several steps.
    llm = start_llm(smollm2_dir, runner="pooling", convert="embed", max_model_len=128,
                    max_num_batched_tokens=8, kv_cache_memory_bytes=64 << 20)
    try:
        got = np.array([o.outputs.embedding for o in llm.embed(
            [{"prompt_token_ids": p} for p in prompts], use_tqdm=False)])
    finally:
        shutdown(llm)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    for a, b in PAIRS:
        assert float(got[a] @ got[b]) == pytest.approx(float(want[a] @ want[b]), abs=1e-4)
