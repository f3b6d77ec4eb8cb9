"""The mtp speculative method through vLLM's LLM class on a tiny DeepSeek-V3 whose checkpoint
keeps one MTP layer (tests/deepseek_mtp_checkpoint.py, its "echo" weights: the layer mostly
predicts what the target will). Greedy output equals transformers' greedy output of the
target alone, with prompts prefilled in chunks and a request preempted; most drafts are accepted and vLLM's
acceptance count is the one the drafts and the output imply; every draft vLLM's scheduler
scheduled equals the float64 reference drafter's on transformers' hidden states of the
target; nothing compiles after warm-up."""

import numpy as np
import pytest

from tests.deepseek_mtp_checkpoint import TransformersMtp, save_tiny_deepseek_mtp
from tests.e2e.engines import (generate_ids, in_fresh_process, metric, num_compilations,
                               shutdown, start_llm)
from tests.helpers import hf_greedy_ids

pytestmark = pytest.mark.slow

NUM_NEW = 20
K = 3
# One page (16 tokens) of the latent cache [32 + 16] of the target's 3 layers and the MTP
# layer, float32.
PAGE_BYTES = 4 * 16 * 48 * 4
MARGIN = 1e-3  # reference drafts whose top two logits are closer are not compared


def _record_drafts() -> dict:
    """req_id -> [(tokens the request had, the drafts scheduled to verify after them)], from
    each of vLLM's scheduler outputs (drafts a preemption dropped are not in them)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    log: dict = {}
    original = Scheduler.schedule

    def schedule(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        for rid, drafts in out.scheduled_spec_decode_tokens.items():
            log.setdefault(rid, []).append((self.requests[rid].num_tokens, list(drafts)))
        return out

    Scheduler.schedule = schedule
    return log


def serve_with_drafts(model_dir: str, prompts: list[list[int]]) -> dict:
    """Greedy output through vllm.LLM with the mtp method (in a process whose engine core is
    in it: tests/e2e/isolated.py) and every draft its scheduler scheduled (_record_drafts)."""
    log = _record_drafts()
    # 7 pages cannot hold the three sequences (2 + 3 + 4 pages at the end): vLLM preempts.
    # Synchronous scheduling: the scheduler then holds the drafts (async: placeholders).
    llm = start_llm(model_dir, max_num_seqs=4, max_num_batched_tokens=32,
                    max_model_len=96, kv_cache_memory_bytes=7 * PAGE_BYTES, async_scheduling=False,
                    speculative_config={"method": "mtp", "num_speculative_tokens": K})
    try:
        warm = num_compilations(llm)
        got = generate_ids(llm, prompts, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
        drafted = metric(llm, "vllm:spec_decode_num_draft_tokens")
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
        preemptions = metric(llm, "vllm:num_preemptions")
        compiled = num_compilations(llm) - warm
    finally:
        shutdown(llm)
    return dict(got=got, log=log, drafted=drafted, accepted=accepted,
                preemptions=preemptions, compiled=compiled)


def _target_hidden(model_dir):
    """tokens -> transformers' final (normed) hidden states of the target, float64 [N, D]."""
    import torch
    import transformers

    model = transformers.DeepseekV3ForCausalLM.from_pretrained(
        model_dir, dtype=torch.float64, attn_implementation="eager",
        experts_implementation="eager").eval()

    def hidden(tokens: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model.model(torch.tensor([tokens])).last_hidden_state[0].numpy()
    return hidden


def test_greedy_equals_the_target_alone_and_drafts_equal_the_reference(tmp_path):
    model_dir = save_tiny_deepseek_mtp(tmp_path / "deepseek", echo=True)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 21, 38)]
    # K tokens past the end: vLLM verifies (and counts) drafts beyond max_tokens too.
    longer = hf_greedy_ids(model_dir, prompts, NUM_NEW + K)
    expected = [e[:NUM_NEW] for e in longer]
    # The scheduler in a process of its own (tests/e2e/isolated.py).
    served = in_fresh_process("tests.e2e.test_llm_deepseek_mtp:serve_with_drafts",
                              tmp_path / "served.json", model_dir=str(model_dir),
                              prompts=prompts)
    log, drafted, accepted = served["log"], served["drafted"], served["accepted"]
    assert served["got"] == expected
    assert served["compiled"] == 0 and served["preemptions"] > 0
    ref, target_hidden = TransformersMtp(model_dir), _target_hidden(model_dir)
    by_index = {int(rid.split("-")[0]): entries for rid, entries in log.items()}
    assert sorted(by_index) == [0, 1, 2]  # LLM.generate numbers requests in order
    implied, compared, skipped = 0, 0, 0
    for rid, (prompt, out) in enumerate(zip(prompts, longer)):
        tokens = prompt + out
        hidden = target_hidden(tokens)
        for n, drafts in by_index[rid]:
            # Accepted: the drafts agreeing with the output, up to the first that does not.
            following = tokens[n:n + len(drafts)]
            implied += next((i for i, (d, t) in enumerate(zip(drafts, following)) if d != t),
                            len(following))
            want, margins = _reference_drafts(ref, tokens[:n], hidden[:n - 1], len(drafts))
            for j, (d, w, m) in enumerate(zip(drafts, want, margins)):
                if m < MARGIN:  # a near tie: float32 and float64 may rank it either way
                    skipped += 1
                    break
                assert d == w, (rid, n, j, drafts, want)
                compared += 1
    print(f"mtp k={K}: {drafted:.0f} drafted, {accepted:.0f} accepted; {compared} drafts "
          f"equal to the reference's, {skipped} near ties not compared")
    assert drafted == sum(len(d) for entries in log.values() for _, d in entries)
    assert compared > 10 * max(skipped, 1)
    assert accepted == implied
    assert drafted > accepted > drafted / 2


def test_a_target_with_two_mtp_layers_is_refused_at_start_up(tmp_path):
    """(num_nextn_predict_layers 0, e.g. Kimi-K2: vLLM's own config fails first, dividing
    num_speculative_tokens by it.)"""
    from vllm.engine.arg_utils import EngineArgs

    from tests.models.test_deepseek_v3 import save_tiny_deepseek_v3

    model_dir = save_tiny_deepseek_v3(tmp_path / "m", num_nextn_predict_layers=2)
    args = EngineArgs(model=str(model_dir), max_model_len=128,
                      speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    with pytest.raises(Exception, match=r"one MTP layer \(num_nextn_predict_layers 1\), not 2"):
        args.create_engine_config()


def _reference_drafts(ref, token_ids, target_hidden, k):
    """ref.propose, with the margin of each draft's top logit over the next."""
    tokens, hidden, drafts, margins = list(token_ids[1:]), target_hidden, [], []
    for _ in range(k):
        y = ref.forward(tokens, hidden)
        logits = np.sort(ref.lm_head @ y[-1])
        drafts.append(int(np.argmax(ref.lm_head @ y[-1])))
        margins.append(logits[-1] - logits[-2])
        tokens.append(drafts[-1])
        hidden = np.concatenate([hidden, y[-1:]])
    return drafts, margins


@pytest.mark.parametrize("method", ["int8"])
def test_online_quantization_quantizes_the_mtp_layer_as_the_target(tmp_path, method):
    """--quantization int8 on a float checkpoint: the MTP layer's block is quantized at load
    as the target's layers are (plugin/spec_decode._load_mtp_params); greedy output equals
    the same quantized engine's without speculation, and the quantized echo layer still
    has most drafts accepted."""
    model_dir = save_tiny_deepseek_mtp(tmp_path / "deepseek", echo=True)
    rng = np.random.default_rng(12)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (6, 23, 37)]
    settings = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96,
                    kv_cache_memory_bytes=32 * PAGE_BYTES, quantization=method)
    llm = start_llm(model_dir, **settings)
    try:
        plain = generate_ids(llm, prompts, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    finally:
        shutdown(llm)
    llm = start_llm(model_dir, **settings,
                    speculative_config={"method": "mtp", "num_speculative_tokens": K})
    try:
        warm = num_compilations(llm)
        got = generate_ids(llm, prompts, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
        drafted = metric(llm, "vllm:spec_decode_num_draft_tokens")
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
        quantized = llm.collective_rpc("drafter_quantized_weights")[0]
        compiled = num_compilations(llm) - warm
    finally:
        shutdown(llm)
    assert got == plain
    assert quantized > 0
    assert drafted > accepted > drafted / 2
    assert compiled == 0
