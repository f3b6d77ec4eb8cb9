"""Speculative decoding (--speculative-config): which methods this platform serves, and the
drafter the model runner calls after each step.

Served, with synchronous scheduling:
- `ngram`: vLLM's own proposer (prompt lookup, on the host); vLLM turns async scheduling off.
- `draft_model`: a small model of the target's vocabulary (speculative_config's "model")
  drafting greedily on its own JAX engine, its KV cache in the target's pages
  (runner/draft_model.py). vLLM would schedule it asynchronously; the platform turns that
  off (use_synchronous_scheduling).
Drafts are verified on device by rejection sampling (sampling/rejection.py); greedy drafts
count as one-hot, as vLLM's default draft_sample_method "greedy". Every other method
(eagle, eagle3, mtp, ...) is refused at start-up. vLLM's num_speculative_tokens_per_batch_size
caps the drafts proposed after a step (plugin/model_runner._propose; 0: no proposer work).
"""

import logging

import numpy as np

logger = logging.getLogger(__name__)

SERVED_METHODS = ("ngram", "draft_model")
# The draft model's attention layers in vLLM's KV cache config, beside the target's.
DRAFT_LAYER_PREFIX = "draft_model."


def draft_layer_name(i: int) -> str:
    return f"{DRAFT_LAYER_PREFIX}model.layers.{i}.self_attn.attn"


def use_synchronous_scheduling(vllm_config) -> None:
    """vLLM turns async scheduling on for draft_model by default (before the platform's
    hook); this platform serves drafts with synchronous scheduling only."""
    spec = vllm_config.speculative_config
    if spec is not None and spec.method == "draft_model" and \
            vllm_config.scheduler_config.async_scheduling:
        logger.warning("xla-inference serves draft_model speculative decoding with "
                       "synchronous scheduling: async scheduling turned off")
        vllm_config.scheduler_config.async_scheduling = False


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
        raise ValueError("xla-inference serves speculative decoding with synchronous "
                         "scheduling only; drop --async-scheduling")
    if method == "draft_model":
        _refuse_unserved_draft_options(spec)
    extra = vllm_config.additional_config
    dp = 1
    if isinstance(extra, dict):  # before or after platform._fold_data_parallel
        dp = int(extra.get("xla_data_parallel_size", extra.get("data_parallel_size", 1)))
    if dp > 1 or vllm_config.parallel_config.data_parallel_size > 1:
        raise ValueError("xla-inference does not support speculative decoding with data "
                         "parallel replicas yet")


def _refuse_unserved_draft_options(spec) -> None:
    """draft_model options this platform does not serve: drafts are greedy, one per step
    and token, from a model of the target's vocabulary."""
    refusals = [
        (getattr(spec, "use_heterogeneous_vocab", False),
         "a draft model with another vocabulary (use_heterogeneous_vocab)"),
        (getattr(spec, "draft_sample_method", "greedy") != "greedy",
         f"draft_sample_method {getattr(spec, 'draft_sample_method', None)!r} (served: greedy)"),
        (getattr(spec, "rejection_sample_method", "standard") != "standard",
         f"rejection_sample_method {getattr(spec, 'rejection_sample_method', None)!r} "
         "(served: standard)"),
        (getattr(spec, "parallel_drafting", False), "parallel_drafting"),
    ]
    for refused, what in refusals:
        if refused:
            raise ValueError(f"xla-inference does not support {what} with draft_model "
                             "speculative decoding yet")
    target = spec.target_model_config.get_vocab_size()
    draft = spec.draft_model_config.get_vocab_size()
    if target != draft:
        raise ValueError(f"the draft model's vocabulary ({draft} tokens) differs from the "
                         f"target's ({target}); xla-inference drafts with a model of the same "
                         "vocabulary")


def load_draft_model(vllm_config, precision, dummy: bool):
    """The draft model's weights on the host (runner/build.load), in the target's precision;
    None unless the method is draft_model."""
    spec = vllm_config.speculative_config
    if spec is None or spec.method != "draft_model":
        return None
    from xla_inference.plugin.quantization import loader_method
    from xla_inference.runner.build import load

    draft = spec.draft_model_config
    model = load(draft.model, precision, random_seed=(draft.seed or 0) if dummy else None,
                 quantization=loader_method(draft.quantization))
    logger.info("xla-inference: loaded draft model %s (%.1f MiB of weights)", draft.model,
                model.weight_bytes / (1 << 20))
    return model


class NgramDrafter:
    """vLLM's NgramProposer over our requests' token lists."""

    may_skip_steps = True  # stateless: a step without proposals loses nothing

    def start_step(self, requests) -> None:
        """Prompt lookup keeps no state between steps."""

    def forget(self, req_id: str) -> None:
        """Prompt lookup keeps no state per request."""

    def warm_up(self) -> None:
        """vLLM's proposer compiles (numba) when constructed."""

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


def num_speculative_tokens(vllm_config) -> int:
    """Drafts per request and step (0 without speculative decoding)."""
    spec = vllm_config.speculative_config
    return 0 if spec is None else int(spec.num_speculative_tokens)


class DraftModelDrafter:
    """A draft model's greedy proposals (runner/draft_model.DraftProposer) as vLLM's
    DraftTokenIds."""

    may_skip_steps = True  # the next proposal catches the draft's KV up on skipped tokens

    def __init__(self, vllm_config, proposer):
        self.num_speculative_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.proposer = proposer

    def start_step(self, requests) -> None:
        self.proposer.start_step(requests)

    def forget(self, req_id: str) -> None:
        self.proposer.forget(req_id)

    def warm_up(self) -> float:
        return self.proposer.engine.warm_up()

    def propose(self, requests, sampled: list[list[int]]):
        from vllm.v1.outputs import DraftTokenIds

        drafts = self.proposer.propose(requests, sampled)
        return DraftTokenIds([r.req_id for r in requests], drafts)


def build_draft_proposer(vllm_config, draft_model, kv_cache_config, target_engine):
    """The draft model's engine over the target's pages: its layers' groups and shared
    arrays from vLLM's KV cache config, the target's mesh and limits."""
    import dataclasses

    from xla_inference.plugin.worker import kv_layout
    from xla_inference.runner.draft_model import DraftProposer
    from xla_inference.runner.engine import ModelEngine

    if draft_model.vocab_size != target_engine.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft_model.vocab_size} tokens) "
                         f"differs from the target's ({target_engine.vocab_size})")
    cfg = target_engine.cfg
    layer_groups, layer_arrays = kv_layout(kv_cache_config, len(draft_model.kv_layers()),
                                           cfg.block_size, layer_name=draft_layer_name)
    groups = tuple(sorted(set(layer_groups)))  # the target's groups the draft reads
    engine_cfg = dataclasses.replace(
        cfg, layer_groups=tuple(groups.index(g) for g in layer_groups),
        layer_arrays=layer_arrays, num_speculative_tokens=0, whole_vocab_logprobs=False)
    engine = ModelEngine(draft_model.family, draft_model.cfg, draft_model.params, engine_cfg,
                         draft_model.precision.kv_cache, mesh=target_engine.mesh,
                         greedy_drafter=True)
    draft_model.params = None  # the engine holds the placed copy
    spec = vllm_config.speculative_config
    return DraftProposer(engine, groups, spec.num_speculative_tokens, cfg.max_model_len)


def build_drafter(vllm_config, draft_model=None, kv_cache_config=None, target_engine=None):
    """The drafter for the served method, or None without speculative decoding. draft_model
    (load_draft_model's), the KV cache config and the target's engine: for draft_model."""
    if vllm_config.speculative_config is None:
        return None
    refuse_unserved(vllm_config)
    if vllm_config.speculative_config.method == "draft_model":
        return DraftModelDrafter(vllm_config, build_draft_proposer(
            vllm_config, draft_model, kv_cache_config, target_engine))
    return NgramDrafter(vllm_config)
