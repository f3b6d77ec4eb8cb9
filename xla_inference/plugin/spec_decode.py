"""Speculative decoding (--speculative-config): which methods this platform serves, and the
drafter the model runner calls after each step.

Served:
- `ngram`: vLLM's own proposer (prompt lookup, on the host), with synchronous scheduling
  (vLLM's rule: it turns async scheduling off for ngram, and refuses --async-scheduling).
- `draft_model`: a small model of the target's vocabulary (speculative_config's "model")
  drafting greedily on its own JAX engine, its KV cache in the target's pages
  (spec_decode/draft_model.py).
- `eagle3`: an EAGLE-3 head for a Llama-family target (models/eagle3.py), drafting greedily
  from the target's aux hidden states (spec_decode/eagle.py), its KV in the target's pages.
- `eagle`: an EAGLE-1 head (models/eagle1.py) reading the target's final hidden states,
  drafting through the target's LM head, the same way.
- `mtp` (and its alias `deepseek_mtp`): a DeepSeek-V3 target's own MTP layer
  (models/deepseek_mtp.py, `model.layers.{num_hidden_layers}` of the target's checkpoint),
  run as the EAGLE heads are, re-used for every draft; one MTP layer, quantized where the
  checkpoint's are (DeepSeek-V3/R1's block-FP8 export: its layers kept FP8 as the
  target's, _load_mtp_params).
draft_model, eagle3, eagle and mtp keep vLLM's async scheduling (its default): vLLM then
schedules -1 placeholders for the drafts and counts them all accepted until it sees the
step's output; the model runner verifies the drafts it proposed itself and subtracts the
rejected ones from vLLM's count (plugin/model_runner._step_drafts, _correct_optimistic_count).
Drafts are verified on device by rejection sampling (sampling/rejection.py); greedy drafts
count as one-hot, as vLLM's default draft_sample_method "greedy". Every other method
is refused at start-up. vLLM's num_speculative_tokens_per_batch_size caps the
drafts proposed after a step (plugin/model_runner._propose; 0: no proposer work).
Every served method runs with data parallel replicas too (DATA_PARALLEL_METHODS); mtp's
DeepSeek-V3 target runs its experts split across the replicas (layers/moe.py), its MTP
layer, an EAGLE-like head, over every replica's rows in one program.
"""

import logging

import numpy as np

logger = logging.getLogger(__name__)

SERVED_METHODS = ("ngram", "draft_model", "eagle3", "eagle", "mtp")
EAGLE_METHODS = ("eagle3", "eagle", "mtp")  # drafters reading the target's hidden states
# The draft model's attention layers in vLLM's KV cache config, beside the target's.
DRAFT_LAYER_PREFIX = "draft_model."


def draft_layer_name(i: int) -> str:
    return f"{DRAFT_LAYER_PREFIX}model.layers.{i}.self_attn.attn"


# Methods whose drafts the runner proposes itself, so that vLLM may schedule the next step
# before it has this one's drafts (vLLM allows async scheduling for these; not for ngram).
ASYNC_METHODS = ("draft_model", *EAGLE_METHODS)
# Methods served with data parallel replicas: every replica's steps verify together (the
# forward returns every replica's hidden states in the scheduler's order); a draft model's
# engine runs its replicas as the target's does, each replica's draft KV in its own pages,
# and so does an EAGLE head (spec_decode/eagle.py); mtp's MTP layer (sharded as the target, its
# experts over the model axis) runs every replica's rows in one program over all replicas'
# pages.
DATA_PARALLEL_METHODS = ("ngram", "draft_model", "eagle3", "eagle", "mtp")


def use_synchronous_scheduling(vllm_config) -> None:
    """vLLM turns async scheduling off for the methods it does not allow it with (ngram)
    before the platform's hook; kept off here too, should its rule ever change."""
    spec = vllm_config.speculative_config
    if spec is not None and spec.method not in ASYNC_METHODS and \
            vllm_config.scheduler_config.async_scheduling:
        logger.warning("xla-inference serves %s speculative decoding with synchronous "
                       "scheduling: async scheduling turned off", spec.method)
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
    extra = vllm_config.additional_config
    dp = 1
    if isinstance(extra, dict):  # before or after platform._fold_data_parallel
        dp = int(extra.get("xla_data_parallel_size", extra.get("data_parallel_size", 1)))
    if (dp > 1 or vllm_config.parallel_config.data_parallel_size > 1) and \
            method not in DATA_PARALLEL_METHODS:
        raise ValueError(f"xla-inference does not serve {method} speculative decoding with "
                         f"data parallel replicas yet (served: "
                         f"{', '.join(DATA_PARALLEL_METHODS)})")
    if (dp > 1 or vllm_config.parallel_config.data_parallel_size > 1) and \
            vllm_config.lora_config is not None and method in EAGLE_METHODS:
        # Served and tested apart; together not yet tested: refused rather than served unseen.
        raise ValueError(f"xla-inference does not serve {method} speculative decoding with "
                         "LoRA adapters (--enable-lora) and data parallel replicas yet (one "
                         "replica serves them together)")
    if vllm_config.scheduler_config.async_scheduling and method not in ASYNC_METHODS:
        raise ValueError(f"xla-inference serves {method} speculative decoding with "
                         "synchronous scheduling only; drop --async-scheduling")
    if getattr(spec, "rejection_sample_method", "standard") != "standard":
        raise ValueError(f"xla-inference does not support rejection_sample_method "
                         f"{spec.rejection_sample_method!r} with {method} speculative decoding "
                         "yet (served: standard)")
    if method in ("draft_model", *EAGLE_METHODS):
        _refuse_unserved_draft_options(spec)
    if method == "mtp":
        _refuse_unserved_mtp(vllm_config)


def _refuse_unserved_draft_options(spec) -> None:
    """draft_model options this platform does not serve: drafts are greedy, one per step
    and token, from a model of the target's vocabulary."""
    refusals = [
        (getattr(spec, "use_heterogeneous_vocab", False),
         "a draft model with another vocabulary (use_heterogeneous_vocab)"),
        (getattr(spec, "draft_sample_method", "greedy") != "greedy",
         f"draft_sample_method {getattr(spec, 'draft_sample_method', None)!r} (served: greedy)"),
        (getattr(spec, "parallel_drafting", False), "parallel_drafting"),
    ]
    for refused, what in refusals:
        if refused:
            raise ValueError(f"xla-inference does not support {what} with {spec.method} "
                             "speculative decoding yet")
    if spec.method in EAGLE_METHODS:  # EAGLE-3's own vocabulary maps to the target's (d2t)
        return
    target = spec.target_model_config.get_vocab_size()
    draft = spec.draft_model_config.get_vocab_size()
    if target != draft:
        raise ValueError(f"the draft model's vocabulary ({draft} tokens) differs from the "
                         f"target's ({target}); xla-inference drafts with a model of the same "
                         "vocabulary")


def _refuse_unserved_mtp(vllm_config) -> None:
    """mtp: the target must be a DeepSeek-V3 with one MTP layer served by the native family
    (its hidden states are the ones the layer reads), quantized, if at all, by its
    checkpoint."""
    from xla_inference.models.deepseek_mtp import refuse_unserved as refuse_unserved_target
    from xla_inference.plugin.worker import model_implementation

    mc = vllm_config.model_config
    refuse_unserved_target(mc.hf_config.to_dict())
    if model_implementation(mc) == "vllm":
        raise ValueError("xla-inference serves mtp for its native DeepSeek-V3 family only "
                         "(not with --model-impl vllm)")


def load_draft_model(vllm_config, precision, dummy: bool):
    """The draft model's weights on the host (runner/build.load), in the target's precision;
    for eagle3, eagle and mtp the head's (load_eagle_head); None for other methods."""
    spec = vllm_config.speculative_config
    if spec is not None and spec.method in EAGLE_METHODS:
        return load_eagle_head(vllm_config, precision, dummy)
    if spec is None or spec.method != "draft_model":
        return None
    from xla_inference.plugin.quantization import loader_method
    from xla_inference.runner.build import load

    draft = spec.draft_model_config
    model = load(_draft_checkpoint_dir(vllm_config, weights=not dummy), precision,
                 random_seed=(draft.seed or 0) if dummy else None,
                 quantization=loader_method(draft.quantization))
    logger.info("xla-inference: loaded draft model %s (%.1f MiB of weights)", draft.model,
                model.weight_bytes / (1 << 20))
    return model


class NgramDrafter:
    """vLLM's NgramProposer over our requests' token lists."""

    may_skip_steps = True  # stateless: a step without proposals loses nothing
    # Across hosts (distributed/multihost.py) only the driver's proposals reach vLLM: its
    # scheduler puts them in the step that verifies them (scheduled_spec_decode_tokens,
    # synchronous scheduling), which every process receives; a follower proposes nothing.
    proposes = True

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

        if not self.proposes:
            return DraftTokenIds([r.req_id for r in requests], [[] for _ in requests])
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
    """A draft model's greedy proposals (spec_decode/draft_model.DraftProposer) as vLLM's
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
    from xla_inference.spec_decode.draft_model import DraftProposer
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


class LoadedEagle:
    """An EAGLE head on the host: its module (models/eagle3, eagle1 or deepseek_mtp), config,
    params."""

    def __init__(self, head, cfg, params):
        self.head, self.cfg, self.params = head, cfg, params

    def kv_layers(self):
        return self.head.kv_layers(self.cfg)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size


def _draft_checkpoint_dir(vllm_config, weights: bool = True):
    """A local directory of the draft's checkpoint (a hub id is fetched as vLLM would;
    weights False: its configs alone, for random weights)."""
    from pathlib import Path

    from xla_inference.loading.hub import local_checkpoint

    draft = vllm_config.speculative_config.draft_model_config
    return Path(local_checkpoint(draft.model, draft.revision, vllm_config.load_config.download_dir,
                                 weights=weights))


def load_eagle_head(vllm_config, precision, dummy: bool) -> LoadedEagle:
    """The EAGLE head's config and weights on the host, in the target's activation dtype
    (a layer or few: nothing to narrow); EAGLE-3's default aux layers from the target's
    depth."""
    import json

    from xla_inference.loading.safetensors import CheckpointTensors, safetensors_files
    from xla_inference.models import deepseek_mtp, eagle1, eagle3

    method = vllm_config.speculative_config.method
    if dummy:
        raise ValueError(f"xla-inference does not serve {method} speculative decoding with "
                         "random (dummy) weights")
    # mtp: vLLM names the target's checkpoint as the draft's.
    path = _draft_checkpoint_dir(vllm_config)
    hf = json.loads((path / "config.json").read_text())
    tensors = CheckpointTensors(safetensors_files(path))
    if method == "mtp":
        cfg = deepseek_mtp.MtpConfig.from_hf(hf)
        params = _load_mtp_params(vllm_config, path, cfg, precision)
        logger.info("xla-inference: loaded the MTP layer %d of %s", cfg.mtp_layer, path)
        return LoadedEagle(deepseek_mtp, cfg, params)
    if method == "eagle":
        cfg = eagle1.Eagle1Config.from_hf(hf)
        params = eagle1.load_params(tensors, cfg, precision.activations)
        logger.info("xla-inference: loaded EAGLE-1 head %s (%d layers)", path, cfg.num_layers)
        return LoadedEagle(eagle1, cfg, params)
    target_layers = vllm_config.model_config.get_total_num_hidden_layers()
    cfg = eagle3.Eagle3Config.from_hf(hf, target_layers)
    params = eagle3.load_params(tensors, cfg, precision.activations)
    logger.info("xla-inference: loaded EAGLE-3 head %s (aux layers %s, draft vocabulary %d)",
                path, cfg.aux_layer_ids, cfg.draft_vocab_size)
    return LoadedEagle(eagle3, cfg, params)


def _load_mtp_params(vllm_config, path, cfg, precision):
    """The MTP layer as the target's layers are loaded (runner/build.load, models/loader.py):
    a quantized checkpoint's projections and experts read by its format's reader and kept
    quantized (what the exporter left float, e.g. DeepSeek's eh_proj, stays float); on a
    float checkpoint with online --quantization int8/fp8, the block's projections and
    expert stacks quantized per output channel as the target's are (eh_proj, not a
    projection of the block, stays float as an exporter leaves it); the projections
    narrowed where the target's are."""
    from xla_inference.loading.checkpoint import load_checkpoint
    from xla_inference.loading.params import (narrow_projections, pack_quantized,
                                              quantize_projections)
    from xla_inference.models import deepseek_mtp
    from xla_inference.plugin.quantization import loader_method
    from xla_inference.quantization.online import ONLINE_METHODS

    method = loader_method(vllm_config.model_config.quantization)
    _, tensors = load_checkpoint(path, None, method)
    params = deepseek_mtp.load_params(tensors, cfg, precision.activations)
    if method in ONLINE_METHODS and not hasattr(tensors, "quantized_weight"):
        # The target's rule (models/loader.load_model): online only on a float checkpoint.
        params = quantize_projections(params, ONLINE_METHODS[method])
    params = pack_quantized(params, precision.weights, precision.activations)
    if precision.narrows_projections:
        params = narrow_projections(params, precision.weights)
    return params


def prepare_target(vllm_config, model, draft_model):
    """The target as the drafter needs it: for eagle3, its forward also returns the aux
    hidden states the head reads (models/eagle3.with_aux_hidden_states)."""
    spec = vllm_config.speculative_config
    if spec is None or spec.method not in EAGLE_METHODS:
        return model
    from xla_inference.models.eagle3 import with_aux_hidden_states

    head = draft_model.cfg
    if spec.method == "mtp":
        from xla_inference.models import deepseek_v3

        if model.family is not deepseek_v3.FAMILY or model.cfg.hidden_size != head.hidden_size \
                or model.vocab_size != head.vocab_size:
            raise ValueError(f"the mtp speculative method needs the DeepSeek-V3 target its MTP "
                             f"layer belongs to; the target is {model.family.name}")
        return model
    if spec.method == "eagle":
        if head.hidden_size != model.cfg.hidden_size or head.vocab_size != model.vocab_size:
            raise ValueError(f"the EAGLE head has hidden size {head.hidden_size} and "
                             f"{head.vocab_size} tokens; the target {model.cfg.hidden_size} "
                             f"and {model.vocab_size}")
        return model
    if head.target_hidden_size != model.cfg.hidden_size or head.vocab_size != model.vocab_size:
        raise ValueError(f"the EAGLE-3 head expects a target of hidden size "
                         f"{head.target_hidden_size} and {head.vocab_size} tokens; the target "
                         f"has {model.cfg.hidden_size} and {model.vocab_size}")
    model.family = with_aux_hidden_states(model.family, model.cfg, head.aux_layer_ids)
    return model


class EagleDrafter:
    """An EAGLE head's greedy proposals (spec_decode/eagle.EagleProposer) as DraftTokenIds."""

    def __init__(self, vllm_config, proposer, target_engine):
        self.num_speculative_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.proposer, self.target_engine = proposer, target_engine

    def start_step(self, requests) -> None:
        self.proposer.start_step(requests)

    def forget(self, req_id: str) -> None:
        self.proposer.forget(req_id)

    def saw_target_step(self, scheduled, hidden) -> None:
        self.proposer.saw_target_step(scheduled, hidden)

    def warm_up(self) -> float:
        return self.proposer.warm_up(self.target_engine.params.embed.dtype)

    def propose(self, requests, sampled: list[list[int]]):
        from vllm.v1.outputs import DraftTokenIds

        drafts = self.proposer.propose(requests, sampled)
        return DraftTokenIds([r.req_id for r in requests], drafts)


def build_eagle_proposer(vllm_config, head: LoadedEagle, kv_cache_config, target_engine):
    """The head's proposer over the target's pages and mesh: its layers' group from vLLM's
    KV cache config, the target's buckets and limits; the target's embedding where the head
    has none, and for EAGLE-1 the target's LM head."""
    import dataclasses

    from xla_inference.plugin.worker import kv_layout
    from xla_inference.spec_decode.eagle import EagleLimits, EagleProposer

    method = vllm_config.speculative_config.method
    if target_engine.microbatches > 1:
        raise ValueError(f"xla-inference does not serve {method} with pipeline stages yet")
    from xla_inference.models import deepseek_v3
    from xla_inference.models.eagle3 import returns_aux_hidden_states

    if method == "mtp" and target_engine.model.forward is not deepseek_v3.forward:
        raise ValueError("xla-inference serves mtp for its native DeepSeek-V3 family only")
    if method == "eagle3" and not returns_aux_hidden_states(target_engine.model):
        # e.g. --model-impl vllm
        raise ValueError("xla-inference serves eagle3 for targets of its native JAX decoder "
                         "families only (not through vLLM's PyTorch model classes)")
    cfg = target_engine.cfg
    layer_groups, _ = kv_layout(kv_cache_config, len(head.kv_layers()), cfg.block_size,
                                layer_name=draft_layer_name)
    if len(set(layer_groups)) != 1:
        raise ValueError("the EAGLE head's layers landed in several KV cache groups")
    # Data parallel (R replicas): an EAGLE head's requests run each replica's on its own data
    # slice, over its own share of the head's KV (vLLM's global page ids: replica r's from
    # r * pages_per_replica), as the target's do; buckets and rows are a replica's. mtp's
    # MTP layer is sharded as the target over the model axis (not per replica): it runs
    # every replica's rows (R * T in the scheduler's order) in one program over all
    # replicas' pages.
    R = target_engine.replicas
    per_replica = not getattr(head.head, "SHARDED_AS_TARGET", False)
    rows = 1 if per_replica else R
    limits = EagleLimits(
        token_buckets=tuple(rows * T for T in target_engine.token_buckets),
        max_num_seqs=rows * cfg.max_num_seqs, max_model_len=cfg.max_model_len,
        block_size=cfg.block_size,
        num_slots=rows * target_engine.blocks_per_replica * cfg.block_size,
        groups=layer_groups[:1],
        num_speculative_tokens=vllm_config.speculative_config.num_speculative_tokens,
        replicas=R if per_replica else 1)
    params = head.params
    if params.embed is None:  # the checkpoint shares the target's embedding
        params = dataclasses.replace(params, embed=target_engine.params.embed)
    if method in ("eagle", "mtp"):  # mtp: as vLLM, the target's (shared_head.head a copy)
        params = dataclasses.replace(params, lm_head=target_engine.params.lm_head)
    head.params = None  # the proposer holds the placed copy
    kv_dtype = target_engine.kv_cache.arrays[0][0].dtype
    return EagleProposer(head.head, params, head.cfg, limits, target_engine.mesh, kv_dtype)


def build_drafter(vllm_config, draft_model=None, kv_cache_config=None, target_engine=None):
    """The drafter for the served method, or None without speculative decoding. draft_model
    (load_draft_model's), the KV cache config and the target's engine: for draft_model."""
    if vllm_config.speculative_config is None:
        return None
    refuse_unserved(vllm_config)
    if vllm_config.speculative_config.method == "draft_model":
        return DraftModelDrafter(vllm_config, build_draft_proposer(
            vllm_config, draft_model, kv_cache_config, target_engine))
    if vllm_config.speculative_config.method in EAGLE_METHODS:
        return EagleDrafter(vllm_config, build_eagle_proposer(
            vllm_config, draft_model, kv_cache_config, target_engine), target_engine)
    return NgramDrafter(vllm_config)
