"""`python -m tests.e2e.eagle3_run TARGET HEAD [METHOD] OUT.json`: greedy generation with an
EAGLE head (METHOD eagle3, the default, or eagle) through vllm.LLM, the engine core in this
process, recording every request's drafts as vLLM's scheduler keeps them; writes {outputs,
drafts, accepted, drafted} as JSON.
Run with VLLM_PLUGINS=none it is vLLM's own CPU backend (tests/e2e/engines.vllm_cpu_reference);
tests/e2e/test_llm_eagle3.py runs the same with this platform."""

import json
import os
import sys

# Prompts that fit one step (64 tokens) each: with prompts in chunks, vLLM's CPU backend
# proposed one draft of 135 otherwise than ours, where a float64 reference of the head
# on transformers' hidden states sides with ours (a margin of 0.018 between two logits).
PROMPTS_SEED, LENGTHS, NUM_NEW, K = 3, (5, 33, 17, 9), 16, 3


def prompts():
    import numpy as np

    rng = np.random.default_rng(PROMPTS_SEED)
    return [rng.integers(3, 128, size=n).tolist() for n in LENGTHS]


def record_drafts() -> dict:
    """req_id -> the drafts of each step, in order (Scheduler.update_draft_token_ids)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    log: dict = {}
    original = Scheduler.update_draft_token_ids

    def update(self, draft_token_ids):
        original(self, draft_token_ids)
        for rid in draft_token_ids.req_ids:  # what it keeps (none for a prompt chunk)
            if rid in self.requests and not self.requests[rid].is_prefill_chunk:
                log.setdefault(rid, []).append([int(t) for t in self.requests[rid].spec_token_ids])

    Scheduler.update_draft_token_ids = update
    return log


def run(target: str, head: str, method: str = "eagle3", **llm_args) -> dict:
    from tests.e2e.engines import generate_ids, metric, shutdown, start_llm

    log = record_drafts()
    # Synchronous scheduling: vLLM's scheduler then holds each step's drafts (under async
    # scheduling it holds -1 placeholders; tests/e2e/test_llm_spec_async.py).
    args = dict(max_num_seqs=4, max_num_batched_tokens=64, enable_prefix_caching=False,
                async_scheduling=False,
                speculative_config={"method": method, "model": head,
                                    "num_speculative_tokens": K})
    llm = start_llm(target, **{**args, **llm_args})
    try:
        outputs = generate_ids(llm, prompts(), max_tokens=NUM_NEW, temperature=0.0,
                               ignore_eos=True)
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
        drafted = metric(llm, "vllm:spec_decode_num_draft_tokens")
    finally:
        shutdown(llm)
    # Requests are numbered in submission order by LLM.generate.
    drafts = [log[rid] for rid in sorted(log, key=lambda r: int(r.split("-")[0]))]
    return dict(outputs=outputs, drafts=drafts, accepted=accepted, drafted=drafted)


if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    target_dir, head_dir, *method, out = sys.argv[1:]
    result = run(target_dir, head_dir, *method)
    with open(out, "w") as f:
        json.dump(result, f)
