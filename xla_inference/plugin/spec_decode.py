"""Speculative decoding (--speculative-config): which methods this platform serves, and the
host-side drafter the model runner calls after each step.

Served: `ngram`, vLLM's own proposer (prompt lookup, on the host), with synchronous
scheduling (vLLM turns async scheduling off for it); drafts are verified on device by
rejection sampling (sampling/rejection.py). Every other method is refused at start-up.
"""

import numpy as np

SERVED_METHODS = ("ngram",)


def refuse_unserved(vllm_config) -> None:
    """Raise at start-up, naming the method, for what the engine cannot serve."""
    spec = vllm_config.speculative_config
    if spec is None:
        return
    method = spec.method
    if method not in SERVED_METHODS:
        raise ValueError(
            f"xla-inference does not support speculative decoding method {method!r} "
            f"(--speculative-config) yet; served: {', '.join(SERVED_METHODS)}")
    if vllm_config.scheduler_config.async_scheduling:
        raise ValueError("xla-inference serves n-gram speculative decoding with synchronous "
                         "scheduling only; drop --async-scheduling")
    extra = vllm_config.additional_config
    dp = 1
    if isinstance(extra, dict):  # before or after platform._fold_data_parallel
        dp = int(extra.get("xla_data_parallel_size", extra.get("data_parallel_size", 1)))
    if dp > 1 or vllm_config.parallel_config.data_parallel_size > 1:
        raise ValueError("xla-inference does not support speculative decoding with data "
                         "parallel replicas yet")


class NgramDrafter:
    """vLLM's NgramProposer over our requests' token lists."""

    def __init__(self, vllm_config):
        from vllm.v1.spec_decode.ngram_proposer import NgramProposer

        self.num_speculative_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        self.proposer = NgramProposer(vllm_config)

    def propose(self, requests, sampled: list[list[int]]):
        """Drafts for every request that got tokens this step -> vLLM's DraftTokenIds."""
        from vllm.v1.outputs import DraftTokenIds

        lengths = np.array([len(r.token_ids) for r in requests], np.int32)
        tokens = np.zeros((len(requests), self.max_model_len), np.int32)
        for i, r in enumerate(requests):
            n = min(len(r.token_ids), self.max_model_len)
            tokens[i, :n] = r.token_ids[:n]
        drafts = self.proposer.propose(self.num_speculative_tokens, sampled, lengths, tokens)
        return DraftTokenIds([r.req_id for r in requests], drafts)


def build_drafter(vllm_config):
    """The drafter for the served method, or None without speculative decoding."""
    if vllm_config.speculative_config is None:
        return None
    refuse_unserved(vllm_config)
    return NgramDrafter(vllm_config)
