"""An LM head adapter outside the forward (runner/engine.py): speculative decoding's verify
step scores each request's draft rows with its own adapter's head, and prompt logprobs are
scored with it too. Base, an lm_head adapter and an attention-only adapter mixed in one
verify step emit transformers+peft's greedy tokens; their prompt logprobs are within 1e-4
of transformers+peft's log_softmax. (No compile after warm-up with both, through
vllm.LLM: test_lora_head_spec_llm.py.)"""

import numpy as np
import pytest

from tests.helpers import ENGINE_BLOCK, engine_request, save_tiny_llama
from tests.lora.lora_helpers import peft_greedy, peft_logits, save_adapter
from tests.lora.test_lora_engine import add

K = 3
PROMPTS = [[5, 9, 17, 33, 2], [3, 44, 12, 90], [120, 4, 4, 56, 13], [8, 77, 31, 2]]


@pytest.fixture(scope="module")
def head_engine(tmp_path_factory):
    """A LoRA engine with verify programs for K drafts, and its adapters."""
    import jax.numpy as jnp

    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    root = tmp_path_factory.mktemp("head_scoring")
    model_dir = save_tiny_llama(root / "model")
    adapters = {"head": save_adapter(model_dir, root / "head", seed=3, r=8, lora_alpha=16,
                                     target_modules=["lm_head"]),
                "attn": save_adapter(model_dir, root / "attn", seed=4, r=4,
                                     target_modules=["q_proj", "v_proj"])}
    f32 = jnp.dtype(jnp.float32)
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=32,
                        max_num_seqs=4, max_model_len=128, num_speculative_tokens=K)
    engine = build_engine(load(model_dir, Precision(f32, f32, f32)), ecfg,
                          lora=dict(max_loras=2, max_rank=16, max_cpu_loras=2))
    add(engine, 1, adapters["head"])
    add(engine, 2, adapters["attn"])
    return engine, model_dir, adapters


def _requests(lora_ids):
    reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(PROMPTS)]
    for req, lora_id in zip(reqs, lora_ids):
        req.lora_id = lora_id
    return reqs


def test_verify_scores_drafts_with_each_requests_lm_head_adapter(head_engine):
    """Prompt and drafts in one step (as the runner appends them): drafts that follow
    transformers+peft's greedy are accepted up to the first wrong one, which is replaced by
    peft's token; all right: peft's next token as the bonus."""
    engine, model_dir, adapters = head_engine
    lora_ids = [0, 1, 2, 1]
    paths = {0: None, 1: adapters["head"], 2: adapters["attn"]}
    greedy = [peft_greedy(model_dir, paths[i], p, K + 1) for p, i in zip(PROMPTS, lora_ids)]
    assert greedy[1] != peft_greedy(model_dir, None, PROMPTS[1], K + 1)  # the head matters
    # request 1 and 3: all drafts right; 0 and 2: the second one wrong
    wrong = [(g[1] + 1) % 128 for g in greedy]
    drafts = [[g[0], w, g[2]] if i % 2 == 0 else g[:K]
              for i, (g, w) in enumerate(zip(greedy, wrong))]
    reqs = _requests(lora_ids)
    scheduled = []
    for req, d in zip(reqs, drafts):
        req.token_ids.extend(d)
        scheduled.append((req, len(req.token_ids)))
    hidden = engine.forward(scheduled).hidden
    tokens, counts = engine.verify_drafts(hidden, scheduled, drafts, K)
    emitted = [list(row[:n]) for row, n in zip(tokens, counts)]
    want = [g[:2] if i % 2 == 0 else g[:K + 1] for i, g in enumerate(greedy)]
    assert emitted == want


def test_prompt_logprobs_with_each_requests_lm_head_adapter(head_engine):
    """Every prompt position's logprob and top 5 of base, head and attention adapters
    scored in one call (the engine's scorer chunks them), against peft's log_softmax."""
    import scipy.special

    engine, model_dir, adapters = head_engine
    lora_ids = [1, 0, 2, 1]
    paths = {0: None, 1: adapters["head"], 2: adapters["attn"]}
    reqs = _requests(lora_ids)
    hidden = engine.forward([(r, len(r.token_ids)) for r in reqs]).hidden
    rows, targets, row_loras, offset = [], [], [], 0
    for req in reqs:
        n = len(req.token_ids)
        rows += range(offset, offset + n - 1)
        targets += req.token_ids[1:]
        row_loras += [req.lora_id] * (n - 1)
        offset += n
    ids, logprobs, ranks = engine.score_tokens(hidden, np.asarray(rows, np.int32),
                                               np.asarray(targets, np.int32),
                                               engine.logprobs_width([5]),
                                               lora_ids=row_loras)
    pos = 0
    for req, lora_id in zip(reqs, lora_ids):
        want = scipy.special.log_softmax(peft_logits(model_dir, paths[lora_id], req.token_ids),
                                         axis=-1)[:-1].astype(np.float64)
        n = len(want)
        got_ids, got = ids[pos:pos + n], logprobs[pos:pos + n]
        target = np.asarray(req.token_ids[1:])
        np.testing.assert_allclose(got[:, 0], want[np.arange(n), target], atol=1e-4, rtol=0)
        np.testing.assert_allclose(got[:, 1:], np.take_along_axis(want, got_ids[:, 1:], 1),
                                   atol=1e-4, rtol=0)
        assert (got_ids[:, 1] == want.argmax(-1)).all()
        pos += n
    base = scipy.special.log_softmax(peft_logits(model_dir, None, PROMPTS[0]), axis=-1)
    head = scipy.special.log_softmax(peft_logits(model_dir, paths[1], PROMPTS[0]), axis=-1)
    assert np.abs(base - head).max() > 1e-2  # the adapter's head changes the scores
