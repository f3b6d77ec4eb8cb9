"""The vLLM Platform for xla-inference. Runs in the front-end too: keep JAX out of it."""

import copy
import glob
import logging
import os
import sys

import psutil
import torch
from vllm.platforms.interface import Platform, PlatformEnum

from xla_inference.kernels import host_cpu
from xla_inference.plugin import quantization, spec_decode
from xla_inference.plugin.allocator import preload_mimalloc

logger = logging.getLogger(__name__)

_WORKER = "xla_inference.plugin.worker.XlaWorker"
# --kv-cache-dtype values served (runner/build.py Precision.with_kv_cache maps them).
SERVED_KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2")
# Speculative decoding methods served with LoRA adapters: drafts are proposed without the
# adapters (an EAGLE head reads the adapted target's hidden states), verified with them.
LORA_SPECULATIVE_METHODS = ("ngram", "draft_model", "eagle", "eagle3")


def _choose_engine_start_method() -> None:
    """How vLLM starts its engine-core process: spawn, unless VLLM_WORKER_MULTIPROC_METHOD
    asks for fork (`xla-inference serve` does, cli.py) and this process has not imported JAX
    (JAX's runtime threads do not survive a fork). A forked engine core skips re-importing
    vLLM and torch, seconds of a server's start-up (benchmarks/RESULTS.md)."""
    if os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") != "fork" or "jax" in sys.modules:
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"


_MULTIHOST_EXECUTOR = "xla_inference.distributed.multihost.MultiHostExecutor"
_RAY_EXECUTOR = "xla_inference.distributed.ray_executor.RayMultiHostExecutor"
# Their qualnames before distributed/ existed, which the README told users to pass: still
# accepted, and replaced by the new ones (plugin/multihost.py, plugin/ray_executor.py keep
# them importable too).
_OLD_MULTIHOST_EXECUTOR = "xla_inference.plugin.multihost.MultiHostExecutor"
_OLD_RAY_EXECUTOR = "xla_inference.plugin.ray_executor.RayMultiHostExecutor"


def _executor_backend(parallel) -> str:
    """vLLM's executor for this engine: "uni" (one process, every local device), or ours for
    several JAX processes (XLA_INFERENCE_HOSTS > 1, or the executor named in
    --distributed-executor-backend), placed on a Ray cluster for `ray` (ours replaces vLLM's
    Ray executor). vLLM's --nnodes and its own Ray executor class, which would start one
    worker per device, are refused rather than replaced."""
    from xla_inference import envs

    asked = parallel.distributed_executor_backend
    name = asked if isinstance(asked, str) else getattr(asked, "__qualname__", asked)
    if asked == "ray" or name in (_RAY_EXECUTOR, _OLD_RAY_EXECUTOR, "RayMultiHostExecutor"):
        if envs.num_hosts() < 2:
            raise ValueError("xla-inference on Ray (--distributed-executor-backend ray) runs one "
                             "JAX process per host: set XLA_INFERENCE_HOSTS to the number of "
                             "hosts (Ray nodes) the mesh spans, 2 or more")
        return _RAY_EXECUTOR
    if getattr(asked, "uses_ray", False):
        raise ValueError(f"xla-inference does not run vLLM's Ray executor {name} (one worker per "
                         "device); use --distributed-executor-backend ray, which places one "
                         "JAX process per host")
    if asked == "external_launcher":
        raise ValueError("xla-inference does not support --distributed-executor-backend "
                         "external_launcher (one vLLM rank per torchrun process): one JAX "
                         "process drives every local device; to span hosts, set "
                         "XLA_INFERENCE_HOSTS")
    if parallel.nnodes > 1:
        raise ValueError("xla-inference does not use --nnodes/--node-rank (vLLM's one worker "
                         "per device); to span hosts, set XLA_INFERENCE_HOSTS=N, "
                         "XLA_INFERENCE_COORDINATOR and XLA_INFERENCE_FOLLOWERS=external on the "
                         "driver and run `python -m xla_inference.distributed.multihost` on the "
                         "others")
    if envs.num_hosts() > 1 or name in (_MULTIHOST_EXECUTOR, _OLD_MULTIHOST_EXECUTOR,
                                        "MultiHostExecutor"):
        return _MULTIHOST_EXECUTOR
    return "uni"


def _refuse_untested_across_hosts(vllm_config) -> None:
    """Several JAX processes serve a decoder with tensor (and expert) parallel, data
    parallel replicas, and in pipeline stages (the stage axis spanning the processes:
    parallel/pipeline.stage_devices; with data parallel replicas too, each process holding
    its stages of every replica), with LoRA adapters (every add/remove/pin and each
    step's scheduler output reach every process in the driver's order, so each makes the
    same slot writes, reading the adapter from the same path), with every speculative
    method (n-gram: the driver proposes and the drafts ride the step's scheduler output to
    every process, plugin/spec_decode.NgramDrafter.proposes; EAGLE, EAGLE-3, MTP and a
    draft model: every process runs the same draft programs on its shards and reads the
    same replicated drafts), pooling, decoders' and encoder-only embedders' (every process
    pools the same replicated rows), images (their pixels ride the scheduler output), and
    on the torch path (each process places its shards of vLLM's module as it loads,
    parallel/sharding.place), and with the shared-storage and offloading KV connectors
    (each process saves and loads only its own KV heads of every page,
    runner/kv_pages.ProcessSlotCopier: one file per process, its own host tier; the
    connector metadata rides the step's scheduler output to every process and the driver
    joins their transfer results, kv_transfer/steps.ProcessOutputs). What has not been run
    across processes yet is refused, named, rather than risked: the network connector (its
    producer serves, and its consumer fetches, one address per engine, not one per
    process) and KV connectors with data parallel replicas."""
    config = vllm_config.kv_transfer_config
    if config is None or config.kv_connector is None:
        return
    from xla_inference.kv_transfer.config import NETWORK_CONNECTOR

    served = ("XlaSharedStorageConnector and vLLM's OffloadingConnector (--kv-offloading-size) "
              "are served across processes, each process moving its own KV heads")
    if config.kv_connector == NETWORK_CONNECTOR:
        raise ValueError(f"xla-inference does not run {NETWORK_CONNECTOR} across several JAX "
                         "processes (XLA_INFERENCE_HOSTS > 1) yet: its pages are served and "
                         f"fetched at one address per engine, not one per process; {served}")
    if requested_replicas(vllm_config) > 1:
        raise ValueError("xla-inference does not run KV connectors (--kv-transfer-config) with "
                         "data parallel replicas across several JAX processes "
                         f"(XLA_INFERENCE_HOSTS > 1) yet; {served} without data parallel")


def _jax_runs_on_host() -> bool:
    """Whether JAX will use the CPU, decided without importing JAX (this runs in the
    front-end, which must stay JAX-free): no JAX_PLATFORMS naming an accelerator, and no
    GPU or TPU device node."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not (glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel*")
                or glob.glob("/dev/vfio/[0-9]*"))


def _cpu_flags() -> set[str]:
    """The host CPU's feature flags (empty where /proc/cpuinfo cannot be read)."""
    return set(host_cpu.flags())


def _host_has_native_bf16() -> bool:
    """Whether the CPU has native bfloat16 dot products (avx512_bf16), with which XLA's CPU
    backend runs bfloat16 x bfloat16 -> float32 products at about twice float32's rate.
    Without them it has no native bfloat16 arithmetic, and float32 was the faster setting
    on the AVX2 machines measured (benchmarks/RESULTS.md)."""
    return "avx512_bf16" in _cpu_flags()


class XlaPlatform(Platform):
    _enum = PlatformEnum.OOT
    device_name: str = "xla"
    # Tensors vLLM itself creates (sampling metadata, tokens) live on the host.
    device_type: str = "cpu"
    dispatch_key: str = "CPU"
    dist_backend: str = "gloo"
    # What --quantization or a checkpoint's quant_method may name (plugin/quantization.py).
    supported_quantization: list[str] = list(quantization.SERVED_METHODS)

    @property
    def supported_dtypes(self) -> list[torch.dtype]:
        # What dtype="auto" picks (vllm/config/model.py): a float32 checkpoint gets the first
        # entry, another checkpoint its own dtype when listed, else the first entry; an
        # explicit --dtype is not checked against this list. Accelerators, and a host CPU
        # with avx512_bf16, list bfloat16 first, as vLLM's CPU backend does: on the CPU that
        # means bfloat16 projection matrices with float32 accumulation and float32 everywhere
        # else (runner/build.py Precision.for_platform), the faster correct setting there.
        # Without avx512_bf16 only float32 is listed, so "auto" serves every checkpoint in
        # float32 (vLLM logs that it "falls back"). Only consulted if register() imports no
        # vLLM config module (tests/test_platform.py).
        if _jax_runs_on_host() and not _host_has_native_bf16():
            return [torch.float32]
        return [torch.bfloat16, torch.float32]

    @classmethod
    def pre_register_and_update(cls, parser=None) -> None:
        """Called by EngineArgs before it builds the ModelConfig (and by the CLI's parser)."""
        patch_vllm_config()

    @classmethod
    def verify_quantization(cls, quant: str) -> None:
        """vLLM's check of the method it resolved (e.g. an AWQ checkpoint's "auto_awq"),
        with our message: the method and what is served."""
        quantization.refuse_unserved(quant)

    @classmethod
    def import_kernels(cls) -> None:
        """vLLM's C++ kernels are not used (and its default build needs AVX-512)."""

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return "xla"

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        return psutil.virtual_memory().total

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        """JAX places arrays itself; nothing to select."""

    @classmethod
    def is_pin_memory_available(cls) -> bool:
        return False

    @classmethod
    def support_hybrid_kv_cache(cls) -> bool:
        """The engine reads one block table per KV cache group (kernels/metadata.py): vLLM
        may free the pages sliding-window layers no longer read."""
        return True

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        """vLLM's PyTorch models (the torch path, torch_models/) build their Attention layers
        with this backend; the layers then run our paged attention (torch_models/attention.py)."""
        return "xla_inference.torch_models.attention.XlaAttentionBackend"

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        return "vllm.distributed.device_communicators.cpu_communicator.CpuCommunicator"

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        # Runs in the front-end and again in the engine core: idempotent by construction.
        patch_vllm_config()
        from vllm.config import CompilationMode
        from vllm.config.compilation import CUDAGraphMode

        parallel = vllm_config.parallel_config
        spec_decode.use_synchronous_scheduling(vllm_config)
        refuse_unsupported_features(vllm_config)
        # validate_request (same process) refuses what speculative steps do not return yet.
        cls.speculative_decoding = vllm_config.speculative_config is not None
        if vllm_config.lora_config is not None:
            from xla_inference.plugin.lora_requests import load_adapters_before_requests

            load_adapters_before_requests()  # a refused adapter fails its request, not the engine
        transfer = vllm_config.kv_transfer_config
        cls.kv_connector = None if transfer is None else (transfer.kv_role or "kv_both")
        cls.multimodal_modalities = served_modalities(vllm_config.model_config)
        if cls.multimodal_modalities and not _takes_raw_pixels(vllm_config.model_config):
            # This family's encoder takes the processor's normalized pixels only; with vLLM's
            # mm_device_do_normalize the processor would hand it raw uint8 pixels. (Qwen2.5-VL's
            # and Gemma 3's take raw ones and normalize them themselves:
            # plugin/model_runner.mm_pixel_affine, _let_our_towers_normalize.)
            vllm_config.model_config.multimodal_config.mm_device_do_normalize = False
        cls.image_end_limit = _bidirectional_images(vllm_config)
        _fold_data_parallel(vllm_config)
        _fold_pipeline_parallel(vllm_config)
        if parallel.worker_cls == "auto":
            parallel.worker_cls = _WORKER
        # One JAX process drives every local device (SPMD), so one worker; several hosts:
        # one JAX process each, driven by the multi-host executor (distributed/multihost.py).
        parallel.distributed_executor_backend = _executor_backend(parallel)
        if parallel.distributed_executor_backend in (_MULTIHOST_EXECUTOR, _RAY_EXECUTOR):
            _refuse_untested_across_hosts(vllm_config)
        # Async scheduling (vLLM's default where the executor allows it) is kept: the runner
        # feeds each request its own last sampled token, so it never waits on the scheduler.
        compilation = vllm_config.compilation_config
        compilation.mode = CompilationMode.NONE
        compilation.cudagraph_mode = CUDAGraphMode.NONE
        compilation.cudagraph_capture_sizes = []
        cache = vllm_config.cache_config
        _honour_checkpoint_kv_cache_scheme(vllm_config.model_config, cache)
        if cache.cache_dtype not in SERVED_KV_CACHE_DTYPES:
            raise ValueError(f"xla-inference does not support kv_cache_dtype={cache.cache_dtype!r}; "
                             "it serves auto, bfloat16 and float16 (where the platform stores "
                             "that dtype: runner/build.py Precision.with_kv_cache), fp8 "
                             "(= fp8_e4m3) and fp8_e5m2")
        if not cache.user_specified_block_size:
            cache.block_size = 16
        _choose_engine_start_method()
        preload_mimalloc()  # for the engine core vLLM spawns (plugin/allocator.py)

    @classmethod
    def validate_request(cls, processed_inputs, params) -> None:
        """Refuse, with a clear message, what this platform does not serve. Raised as vLLM's
        validation error: the server answers that with a 400 and the message, where any
        other exception becomes an empty 500."""
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import SamplingParams

        from xla_inference.sampling.types import MAX_LOGPROB_TOKEN_IDS

        if not isinstance(params, SamplingParams):
            _validate_pooling_request(params)
            return
        if isinstance(processed_inputs, dict) and processed_inputs.get("type") == "embeds":
            raise VLLMValidationError("xla-inference does not take prompt embeddings yet; send "
                                      "the prompt as text or token ids",
                                      parameter="prompt_embeds")
        if isinstance(processed_inputs, dict) and processed_inputs.get("type") == "multimodal":
            unserved = sorted(set(processed_inputs.get("mm_placeholders") or ())
                              - set(getattr(cls, "multimodal_modalities", ())))
            if unserved:
                raise VLLMValidationError(
                    f"xla-inference does not serve {', '.join(unserved)} inputs of this model "
                    f"yet; it serves {', '.join(cls.multimodal_modalities) or 'no'} inputs",
                    parameter="multi_modal_data")
            _refuse_images_past(getattr(cls, "image_end_limit", None),
                                processed_inputs.get("mm_placeholders") or {})
        _refuse_kv_transfer_params_unserved((params.extra_args or {}).get("kv_transfer_params"),
                                            getattr(cls, "kv_connector", None))
        if getattr(cls, "speculative_decoding", False) and (
                params.logprobs is not None or params.logprob_token_ids):
            raise VLLMValidationError("xla-inference does not return logprobs with "
                                      "speculative decoding (--speculative-config) yet",
                                      parameter="logprobs")
        if getattr(params, "thinking_token_budget", None) is not None:
            # vLLM's samplers end the reasoning when the budget is spent; ours do not yet.
            raise VLLMValidationError("xla-inference does not support thinking_token_budget "
                                      "yet (a cap on reasoning tokens); max_tokens caps the "
                                      "whole output", parameter="thinking_token_budget")
        if params.prompt_logprob_token_ids is not None:
            # vLLM itself serves these only with its V2 model runner, and refuses them first
            # unless VLLM_USE_V2_MODEL_RUNNER=1.
            raise VLLMValidationError("xla-inference does not support prompt_logprob_token_ids "
                                      "yet; prompt_logprobs=-1 gives every token's logprob",
                                      parameter="prompt_logprob_token_ids")
        ids = params.logprob_token_ids or ()
        if len(ids) > MAX_LOGPROB_TOKEN_IDS:
            raise VLLMValidationError(f"xla-inference serves at most {MAX_LOGPROB_TOKEN_IDS} "
                                      f"logprob_token_ids per request, got {len(ids)}",
                                      parameter="logprob_token_ids", value=len(ids))


def _refuse_kv_transfer_params_unserved(transfer, role: str | None) -> None:
    """vLLM drops kv_transfer_params a server cannot act on: the request would run whole
    here while the proxy's other server waits for pages that never come. A 400 instead."""
    from vllm.exceptions import VLLMValidationError

    if not transfer:
        return
    if role is None:
        raise VLLMValidationError("kv_transfer_params need a server started with "
                                  "--kv-transfer-config (a KV connector); this one has none",
                                  parameter="kv_transfer_params")
    wrong_side = {"kv_consumer": "do_remote_decode", "kv_producer": "do_remote_prefill"}
    flag = wrong_side.get(role)
    if flag and isinstance(transfer, dict) and transfer.get(flag):
        raise VLLMValidationError(f"kv_transfer_params {flag} asks this server for the other "
                                  f"side of the transfer, but it is a {role}",
                                  parameter="kv_transfer_params")


def _bidirectional_images(vllm_config) -> int | None:
    """Models whose image tokens attend to each other both ways (vLLM's "mm prefix LMs":
    Gemma 3): vLLM schedules each image's placeholders whole, as it does on CUDA, since our
    step widens an image's attention to its last token only when that token is in the
    step (models/gemma3_mm.py). Returns the position an image's tokens must end before
    (its sliding window; None: no limit)."""
    model = vllm_config.model_config
    if not served_modalities(model) or not model.is_mm_prefix_lm:
        return None
    if not vllm_config.scheduler_config.disable_chunked_mm_input:
        logger.info("xla-inference: scheduling each image's tokens whole "
                    "(disable_chunked_mm_input) for its bidirectional attention")
        vllm_config.scheduler_config.disable_chunked_mm_input = True
    return getattr(model.hf_text_config, "sliding_window", None)


def _refuse_images_past(limit: int | None, placeholders) -> None:
    from vllm.exceptions import VLLMValidationError

    from xla_inference.models.gemma3_mm import image_too_late_message, last_embedded_position

    for place in placeholders.get("image", ()) if limit else ():
        end = last_embedded_position(place.offset, place.length, place.is_embed)
        if end >= limit:
            raise VLLMValidationError(image_too_late_message(end, limit),
                                      parameter="multi_modal_data")


def _validate_pooling_request(params) -> None:
    """Pooling requests this platform serves: embed, classify and their per-token forms
    (vLLM has checked the task against the model's and the dimensions already)."""
    from vllm.exceptions import VLLMValidationError

    if params.task not in ("embed", "classify", "token_embed", "token_classify"):
        raise VLLMValidationError(f"xla-inference does not serve pooling task {params.task!r}",
                                  parameter="task")
    if params.late_interaction_params is not None:
        raise VLLMValidationError("xla-inference does not serve late-interaction scoring",
                                  parameter="late_interaction_params")
    # vLLM has refused step_tag_id / returned_token_ids unless the model pools with STEP.
    if params.task == "token_classify" and params.returned_token_ids:
        from xla_inference.plugin.pooling import STEP_COLUMNS_OF_A_CLASSIFIER

        raise VLLMValidationError(STEP_COLUMNS_OF_A_CLASSIFIER, parameter="returned_token_ids")


def refuse_unsupported_features(vllm_config) -> None:
    """Refuse at start-up, with the flag's name, what this platform would otherwise accept
    and then serve wrongly or die on: a quantization method it does not serve (weights
    would be read as if unquantized), speculative decoding methods we do not serve
    (plugin/spec_decode.py) and KV connectors other than ours (kv_transfer/)."""
    model = vllm_config.model_config
    if model is not None:
        quantization.refuse_unserved(model.quantization, "from --quantization or the "
                                     "checkpoint's quantization_config")
    refusals = [
        (pipeline_parallel_size(vllm_config) > 1 and vllm_config.speculative_config is not None,
         lambda: "pipeline parallel (--pipeline-parallel-size) with speculative decoding"),
        (pipeline_parallel_size(vllm_config) > 1 and model is not None and model.is_moe,
         lambda: "pipeline parallel (--pipeline-parallel-size) on a mixture-of-experts model"),
        (pipeline_parallel_size(vllm_config) > 1 and model is not None
         and model.runner_type == "pooling",
         lambda: "pipeline parallel (--pipeline-parallel-size) on a pooling model"),
        # The verify step scores each request's drafts with its own adapter (the target's
        # hidden states and LM head: runner/engine.verify_drafts), so drafts proposed
        # without it stay lossless. ngram drafts need no model; a draft model drafts with
        # the base model, an EAGLE head from the adapted target's hidden states with its
        # own (and the target's base) weights, as vLLM's drafters get no adapters. mtp's
        # DeepSeek-V3 target takes no adapters (runner/build.LORA_FAMILIES).
        (vllm_config.lora_config is not None and vllm_config.speculative_config is not None
         and vllm_config.speculative_config.method not in LORA_SPECULATIVE_METHODS,
         lambda: "LoRA adapters (--enable-lora) with speculative decoding method "
                 f"{vllm_config.speculative_config.method!r} (--speculative-config; "
                 f"{', '.join(LORA_SPECULATIVE_METHODS)} are served with LoRA)"),
        (vllm_config.lora_config is not None and model is not None
         and model.runner_type == "pooling",
         lambda: "LoRA adapters (--enable-lora) on a pooling model (--runner pooling)"),
        # Only a native family with an encoder reads scheduled_encoder_inputs; elsewhere
        # image tokens would be read as text.
        (model is not None and model.supports_multimodal_inputs and not served_modalities(model),
         lambda: f"image, video or audio inputs of {_architectures(model)} (Qwen2.5-VL "
                 "images and videos, Gemma 3 and Llama 4 images are served natively; "
                 "--language-model-only or --limit-mm-per-prompt with every limit 0 serves its text model)"),
    ]
    refusals += _unread_option_refusals(vllm_config)
    refusals += _kv_connector_refusals(vllm_config)
    extra = vllm_config.additional_config
    unknown = sorted(set(extra) - _ADDITIONAL_CONFIG_KEYS) if isinstance(extra, dict) else []
    refusals.append((bool(unknown), lambda: f"--additional-config keys {unknown} (it reads "
                     "data_parallel_size; the xla_ ones are its own bookkeeping)"))
    for refused, feature in refusals:
        if refused:
            raise ValueError(f"xla-inference does not support {feature()} yet")
    spec_decode.refuse_unserved(vllm_config)


def _unread_option_refusals(vllm_config) -> list:
    """vLLM options that change what a model computes or returns, which this platform's
    runner would otherwise accept and never read (its output then not what vLLM's own
    backends give), or die on at the first step: (refused, feature) pairs."""
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    mm = getattr(model, "multimodal_config", None)
    cache = vllm_config.cache_config
    profiler = vllm_config.profiler_config
    load = vllm_config.load_config
    native = lambda: model is not None and _implementation(model) == "native"  # noqa: E731
    scheduler_cls = vllm_config.scheduler_config.scheduler_cls
    return [
        # A native family reads the checkpoint's safetensors (or GGUF) itself; vLLM's other
        # loaders (tensorizer, sharded_state, bitsandbytes, pt, ...) and their options
        # would go unread, the folder's safetensors served in their place.
        (load.load_format not in _NATIVE_LOAD_FORMATS and native(),
         lambda: f"--load-format {load.load_format} with a native JAX family (served: "
                 f"{', '.join(_NATIVE_LOAD_FORMATS)}; --model-impl vllm loads with vLLM's "
                 "loaders)"),
        (bool(load.model_loader_extra_config) and native(),
         lambda: "--model-loader-extra-config with a native JAX family"),
        (list(load.ignore_patterns or []) != ["original/**/*"] and native(),
         lambda: "--ignore-patterns with a native JAX family (it reads the folder's top-level "
                 "weight files)"),
        (model is not None and model.disable_sliding_window and native(),
         lambda: "--disable-sliding-window with a native JAX family (it reads the window from "
                 "config.json)"),
        (model is not None and bool(model.model_class_overrides) and native(),
         lambda: "--model-class-overrides with a native JAX family (--model-impl vllm serves "
                 "vLLM's classes)"),
        (model is not None and model.use_fp64_gumbel,
         lambda: "--use-fp64-gumbel (the sampler draws in float32)"),
        (vllm_config.offload_config.uva.cpu_offload_gb > 0
         or vllm_config.offload_config.prefetch.offload_group_size > 0,
         lambda: "weight offloading to the CPU (--cpu-offload-gb, --offload-*): the weights "
                 "stay on the devices"),
        (mm is not None and mm.mm_encoder_attn_dtype is not None,
         lambda: f"--mm-encoder-attn-dtype {mm.mm_encoder_attn_dtype} (the vision encoders "
                 "attend at the model's precision)"),
        # JAX uses the devices the process sees: vLLM's own ids would go unread.
        (parallel.assigned_physical_gpu_ids is not None,
         lambda: "--device-ids (choose the devices with CUDA_VISIBLE_DEVICES or "
                 "TPU_VISIBLE_CHIPS: JAX uses every device the process sees)"),
        (requested_replicas(vllm_config) > 1 and scheduler_cls is not None
         and not (isinstance(scheduler_cls, str)
                  and (scheduler_cls.startswith("vllm.") or scheduler_cls == _DP_SCHEDULER)),
         lambda: f"--scheduler-cls {scheduler_cls} with data parallel replicas (each replica "
                 "runs vLLM's own scheduler)"),
        (requested_replicas(vllm_config) > 1
         and parallel.data_parallel_master_ip not in ("127.0.0.1", "localhost"),
         lambda: "data parallel across nodes (--data-parallel-address): the replicas run in "
                 "one engine over this host's devices (XLA_INFERENCE_HOSTS spans hosts)"),
        # The worker profiles with JAX's profiler, into torch_profiler_dir (plugin/worker.py).
        (profiler.profiler not in (None, "torch"),
         lambda: f"--profiler-config's profiler {profiler.profiler!r} (served: 'torch', which "
                 "traces with JAX's profiler into torch_profiler_dir)"),
        (profiler.profiler == "torch" and bool(profiler.torch_profiler_activities),
         lambda: "--profiler-config's torch_profiler_activities (JAX's profiler records the "
                 "host and the device together)"),
        # Our runner keeps vLLM's V1 model-runner contract; under V2 (which a watermark turns
        # on) the scheduler resends a resumed request as new and stops sending its tokens.
        (vllm_config.use_v2_model_runner,
         lambda: "vLLM's V2 model runner (VLLM_USE_V2_MODEL_RUNNER=1, or --watermark-config, "
                 "which needs it)"),
        (model is not None and model.logprobs_mode != "raw_logprobs",
         lambda: f"--logprobs-mode {model.logprobs_mode} (served: raw_logprobs)"),
        (model is not None and bool(model.logits_processors),
         lambda: "custom logits processors (--logits-processors)"),
        (bool(_installed_logits_processor_plugins()),
         lambda: "logits processor plugins (installed in the vllm.logits_processors entry "
                 f"point group: {', '.join(_installed_logits_processor_plugins())})"),
        # An encoder-cache consumer's scheduler leaves out images whose encoder outputs the
        # connector holds, for the runner to load; ours encodes what it is given (and would
        # stop at an image placeholder never encoded).
        (vllm_config.ec_transfer_config is not None,
         lambda: "encoder-cache transfer (--ec-transfer-config): the runner encodes each "
                 "image itself"),
        (vllm_config.aux_output_config.enabled,
         lambda: "returning routed experts (--enable-return-routed-experts)"),
        (parallel.decode_context_parallel_size > 1 or parallel.prefill_context_parallel_size > 1,
         lambda: "context parallelism (--decode-context-parallel-size, "
                 "--prefill-context-parallel-size)"),
        (mm is not None and mm.enable_mm_embeds,
         lambda: "image or video embeddings as inputs (--enable-mm-embeds)"),
        (mm is not None and mm.is_multimodal_pruning_enabled(),
         lambda: "video token pruning (--video-pruning-rate)"),
        (bool(cache.kv_cache_dtype_skip_layers) and str(cache.cache_dtype).startswith("fp8"),
         lambda: "--kv-cache-dtype-skip-layers (one KV cache dtype serves every layer)"),
        # A native family reads the checkpoint's config.json, not vLLM's overridden hf_config.
        (model is not None and bool(model.hf_overrides or model.hf_config_path)
         and _implementation(model) == "native",
         lambda: "--hf-overrides or --hf-config-path with a native JAX family (it reads the "
                 "checkpoint's config.json); --model-impl vllm serves them through vLLM's "
                 "model class"),
    ]


# --load-format values a native family serves: its own safetensors and GGUF readers, and
# random weights.
_NATIVE_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


def _installed_logits_processor_plugins() -> list[str]:
    """Names of the logits processors installed as plugins, which vLLM's own runners apply
    to every request (vllm/v1/sample/logits_processor: its entry point group)."""
    from importlib.metadata import entry_points

    return sorted(e.name for e in entry_points(group="vllm.logits_processors"))


def _implementation(model_config) -> str:
    from xla_inference.plugin.worker import model_implementation

    return model_implementation(model_config)


def _kv_connector_refusals(vllm_config) -> list:
    """--kv-transfer-config: our shared-storage or network connector or vLLM's OffloadingConnector
    (kv_transfer/), on a generative model, with n-gram speculative decoding or none; with data
    parallel replicas each replica runs its own (kv_transfer/replicas.py)."""
    from vllm import envs as vllm_envs

    from xla_inference.kv_transfer.config import refuse_unserved, refuse_unserved_offloading_size

    refuse_unserved_offloading_size(vllm_config.cache_config, vllm_envs.VLLM_USE_SIMPLE_KV_OFFLOAD)
    config = vllm_config.kv_transfer_config
    if config is not None and config.kv_connector is not None:
        refuse_unserved(config)
    elif vllm_config.cache_config.kv_offloading_size is None:
        return []
    model = vllm_config.model_config
    return [
        (model is not None and model.runner_type == "pooling",
         lambda: "KV connectors (--kv-transfer-config) on a pooling model (--runner pooling)"),
        # Pipeline stages hold the cache as [stages * slots] per replica; the page copier
        # reads it as one stage's slots, so a load would write into another stage's (or,
        # with data parallel replicas, another replica's) pages.
        (pipeline_parallel_size(vllm_config) > 1,
         lambda: "KV connectors (--kv-transfer-config) with pipeline parallel "
                 "(--pipeline-parallel-size)"),
        # A drafter with its own KV (a draft model) or reading the target's hidden states
        # (EAGLE, MTP) never computes them for tokens a connector loaded: its drafts after
        # a load would come from pages it never wrote. n-gram drafts need only the tokens.
        (vllm_config.speculative_config is not None
         and vllm_config.speculative_config.method != "ngram",
         lambda: "KV connectors (--kv-transfer-config) with speculative decoding method "
                 f"{vllm_config.speculative_config.method!r}: its drafter's KV or hidden "
                 "states of the tokens a connector loads are never computed (ngram is "
                 "served with KV connectors)"),
    ]


def _architectures(model_config) -> str:
    return ", ".join(model_config.architectures or []) or "this model"


def _native_family_serves(model_config) -> bool:
    """Whether --model-impl (auto or native) resolves to one of our JAX families (as the
    worker's model_implementation resolves it)."""
    if str(model_config.model_impl) == "vllm":
        return False
    from xla_inference.models.registry import native_family

    return native_family(list(model_config.architectures or [])) is not None


def _native_multimodal_family(model_config) -> bool:
    """Whether our JAX family for this model has an encoder (ModelFamily.multimodal): the
    engine runs its multimodal steps only without data parallel replicas."""
    if str(model_config.model_impl) == "vllm":
        return False
    from xla_inference.models.registry import native_family

    family = native_family(list(model_config.architectures or []))
    return family is not None and family.multimodal is not None


def served_modalities(model_config) -> tuple[str, ...]:
    """The inputs our native family for this multimodal model encodes (models/, a family's
    `multimodal`); () for a text model, a model we have no encoder for, or the torch path
    (--model-impl vllm). Requests with other modalities are refused (validate_request)."""
    if model_config is None or not model_config.supports_multimodal_inputs:
        return ()
    if str(model_config.model_impl) == "vllm":
        return ()
    from xla_inference.models.registry import native_family

    family = native_family(list(model_config.architectures or []))
    return family.multimodal.modalities if family and family.multimodal else ()


def _takes_raw_pixels(model_config) -> bool:
    from xla_inference.models.registry import native_family

    family = native_family(list(model_config.architectures or []))
    return bool(family and family.multimodal and family.multimodal.raw_pixels)


def pipeline_parallel_size(vllm_config) -> int:
    """Pipeline stages this engine runs: vLLM's setting, or once _fold_pipeline_parallel
    has run, the one it kept."""
    extra = vllm_config.additional_config
    kept = int(extra.get("xla_pipeline_parallel_size", 1)) if isinstance(extra, dict) else 1
    return max(kept, vllm_config.parallel_config.pipeline_parallel_size)


def _fold_pipeline_parallel(vllm_config) -> None:
    """--pipeline-parallel-size N: N stages of the model's layers on a stage axis of our one
    mesh (parallel/pipeline.py), run by one program in this one worker, rather than vLLM's
    N worker processes passing activations. vLLM is told pipeline parallel 1 (world size
    TP): its scheduler then keeps one batch in flight, not N (our step splits its requests
    into micro-batches that the stages pipeline), and nothing asks for vLLM's pipeline process groups. vLLM
    has by then already turned async scheduling off for PP (its V1 model runner's rule);
    it stays off."""
    parallel = vllm_config.parallel_config
    size = parallel.pipeline_parallel_size
    if size == 1:
        return
    extra = vllm_config.additional_config
    if not isinstance(extra, dict):
        raise ValueError("xla-inference keeps the pipeline parallel size in additional_config, "
                         "which must be a dict")
    extra["xla_pipeline_parallel_size"] = size
    parallel.pipeline_parallel_size = 1
    parallel.world_size = parallel.tensor_parallel_size * parallel.prefill_context_parallel_size


_DP_SCHEDULER = "xla_inference.plugin.dp_scheduler.DataParallelScheduler"
# What additional_config may hold: the replicas asked for, and what the folds keep (a typo,
# "data_paralel_size", would otherwise serve one replica without a word).
_ADDITIONAL_CONFIG_KEYS = frozenset({"data_parallel_size", "xla_data_parallel_size",
                                     "xla_pipeline_parallel_size"})


def requested_replicas(vllm_config) -> int:
    """Data parallel replicas asked for, before or after _fold_data_parallel has run (the
    flag, additional_config's data_parallel_size, or the folded count)."""
    extra = vllm_config.additional_config
    return max(vllm_config.parallel_config.data_parallel_size, data_parallel_size(vllm_config),
               int(extra.get("data_parallel_size", 1)) if isinstance(extra, dict) else 1)


def data_parallel_size(vllm_config) -> int:
    """Data parallel replicas this engine runs (set by _fold_data_parallel)."""
    extra = vllm_config.additional_config
    return int(extra.get("xla_data_parallel_size", 1)) if isinstance(extra, dict) else 1


def _honour_checkpoint_kv_cache_scheme(model_config, cache) -> None:
    """A checkpoint that declares FP8 KV cache scales (compressed-tensors' kv_cache_scheme)
    gets an fp8 cache when kv_cache_dtype is "auto", as vLLM's Attention layers decide on
    CUDA; an explicit dtype wins. Its scales are e4m3's: fp8_e5m2 is refused, as vLLM does."""
    from xla_inference.quantization.kv_cache_scales import declares_kv_cache_scales

    hf_config = getattr(model_config, "hf_config", None)
    quant = getattr(hf_config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict() if hasattr(quant, "to_dict") else vars(quant)
    if not declares_kv_cache_scales(quant):
        return
    if cache.cache_dtype == "auto":
        cache.cache_dtype = "fp8"
    elif cache.cache_dtype == "fp8_e5m2":
        raise ValueError("kv_cache_dtype fp8_e5m2 cannot use this checkpoint's FP8 (e4m3) KV "
                         "cache scales; use fp8 (or auto)")


def _fold_data_parallel(vllm_config) -> None:
    """--data-parallel-size N (or LLM(additional_config={"data_parallel_size": N}), vLLM's
    LLM class refusing the flag): N independent replicas inside this one engine, one SPMD
    program over a (data, model) mesh, instead of vLLM's N engine processes. vLLM is told
    data parallel 1 (one engine core), our scheduler runs N of vLLM's schedulers, one per
    replica, each with its own requests and share of the KV pages (plugin/dp_scheduler.py),
    and the engine runs their batches side by side (runner/engine.py)."""
    parallel, model = vllm_config.parallel_config, vllm_config.model_config
    extra = vllm_config.additional_config
    if not isinstance(extra, dict):
        if parallel.data_parallel_size > 1:
            raise ValueError("xla-inference keeps data parallel settings in additional_config, "
                             "which must be a dict")
        return
    size = int(extra.get("xla_data_parallel_size", extra.get("data_parallel_size", 1)))
    if parallel.data_parallel_size > 1:
        if parallel.data_parallel_external_lb or parallel.data_parallel_hybrid_lb:
            raise ValueError("xla-inference runs all data parallel replicas inside one engine "
                             "(one program over the local devices): external or hybrid load "
                             "balancing over separate DP ranks is not supported")
        size = parallel.data_parallel_size
        parallel.reconfigure_for_independent_dp_rank()
    if size < 1:
        raise ValueError(f"data_parallel_size must be at least 1, got {size}")
    if size > 1 and model is not None and _native_multimodal_family(model):
        # The engine keeps one encoder cache and multimodal step for a single replica
        # (runner/engine.py refuses the same at build); said here, before any weight loads.
        raise ValueError(
            f"xla-inference serves multimodal models ({_architectures(model)}) without data "
            "parallel replicas: use --data-parallel-size 1 (with --tensor-parallel-size for "
            "more devices)")
    if size > 1 and model is not None and model.is_moe and not _native_family_serves(model):
        raise ValueError(
            "xla-inference runs an MoE model with data parallel replicas (attention per "
            "replica, the experts split over every device) on its native JAX text families "
            "only (Qwen3-MoE, Mixtral, DeepSeek-V3, and Llama 4's language model, "
            "Llama4ForCausalLM; the released Llama 4 checkpoints, "
            "Llama4ForConditionalGeneration, are multimodal and served without data "
            "parallel); vLLM's PyTorch model class "
            f"(--model-impl vllm or no native family for {_architectures(model)}) does not "
            "split its experts across replicas: use --tensor-parallel-size with "
            "--enable-expert-parallel")
    extra["xla_data_parallel_size"] = size
    if size > 1:
        vllm_config.scheduler_config.scheduler_cls = _DP_SCHEDULER


def patch_vllm_config() -> None:
    """Our changes to vLLM's config checks, in every process that builds or re-checks a
    VllmConfig: the front-end (pre_register_and_update), the engine core (the worker, before
    the handshake re-runs the checks) and any later check (check_and_update_config). Never at
    import or in register(): vLLM is still choosing the platform then, and importing its
    config modules would bind a CPU platform inside them (tests/test_platform.py)."""
    from vllm.config.model import ModelConfig
    from vllm.config.vllm import VllmConfig

    from xla_inference.kv_transfer.config import register_connectors

    _allow_heads_that_do_not_split(ModelConfig)
    _let_our_towers_normalize(ModelConfig)
    register_connectors()  # vLLM resolves a --kv-transfer-config's class while checking it
    quantization.register_methods()
    quantization.refuse_unserved_quantization(ModelConfig)
    quantization.accept_float32_activations(VllmConfig)


def _let_our_towers_normalize(model_config_cls) -> None:
    """vLLM turns mm_device_do_normalize on (its default) only for models whose own class
    declares it can normalize raw pixels (supports_mm_device_do_normalize); its Gemma 3 does
    not. Where our family's tower takes raw pixels (MultimodalSupport.raw_pixels), the
    default or an explicit True keeps it on; an explicit False, vLLM's Rust front end
    (which cannot) and vLLM's own model classes (--model-impl vllm) resolve as vLLM does."""
    original = model_config_cls._resolve_mm_device_do_normalize
    if getattr(original, "_xla_inference", False):
        return

    def resolve(self, requested):
        import vllm.envs as vllm_envs

        if (requested is not False and not vllm_envs.VLLM_USE_RUST_FRONTEND
                and str(self.model_impl) != "vllm" and _takes_raw_pixels(self)):
            return True
        return original(self, requested)

    resolve._xla_inference = True
    model_config_cls._resolve_mm_device_do_normalize = resolve


def _allow_heads_that_do_not_split(model_config_cls) -> None:
    """vLLM requires attention heads divisible by the TP size, because its GPU workers each
    own a slice of the heads. Our one SPMD program replicates whatever does not split evenly
    (parallel/sharding.py), so SmolLM2's 9 heads run at TP 2 and 4: skip only that check."""
    original = model_config_cls.verify_with_parallel_config
    if getattr(original, "_xla_inference", False):
        return

    def verify(self, parallel_config):
        tp = parallel_config.tensor_parallel_size
        if tp > 1 and self.model_arch_config.total_num_attention_heads % tp != 0:
            parallel_config = copy.copy(parallel_config)
            object.__setattr__(parallel_config, "tensor_parallel_size", 1)
        return original(self, parallel_config)

    verify._xla_inference = True
    model_config_cls.verify_with_parallel_config = verify
