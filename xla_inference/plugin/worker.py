"""The vLLM Worker: one process that drives every local JAX device."""

import logging
import time

import psutil
import torch
from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import (FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec,
                                        UniformTypeKVCacheSpecs)
from vllm.v1.worker.worker_base import CompilationTimes, WorkerBase

from xla_inference.kv_transfer.config import size_offload_tier_for_one_process
from xla_inference.plugin.model_runner import XlaModelRunner, mm_pixel_affine
from xla_inference.plugin.platform import (data_parallel_size, patch_vllm_config,
                                          pipeline_parallel_size)
from xla_inference.plugin.quantization import loader_method
from xla_inference.plugin.spec_decode import (build_drafter, draft_layer_name, load_draft_model,
                                               num_speculative_tokens, prepare_target)

logger = logging.getLogger(__name__)

_GiB = 1 << 30
# Host memory kept free beyond the model and the cache: activations of the largest bucket,
# XLA's workspace and compiled programs.
_WORKSPACE_BYTES = 2 * _GiB


def _tolerate_missing_accelerator() -> None:
    """vLLM's engine-core teardown empties torch's accelerator cache on every platform that
    is not its own CPU one; with a CPU-only torch that call raises and the engine dies noisily."""
    if not torch.accelerator.is_available():
        torch.accelerator.empty_cache = lambda: None
        torch.accelerator.empty_host_cache = lambda: None


def _route_logs_through_vllm() -> None:
    """The core logs under `xla_inference` with plain logging; show it the way vLLM shows its own."""
    ours, theirs = logging.getLogger("xla_inference"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(theirs.level)
        ours.propagate = False


def _join_hosts() -> None:
    """With XLA_INFERENCE_HOSTS > 1 (distributed/multihost.py), join this process to the others
    through jax.distributed before JAX starts: the mesh then spans every host's devices."""
    from xla_inference import envs

    if envs.num_hosts() > 1:
        from xla_inference.runner.jax_setup import join_processes

        join_processes(envs.coordinator(), envs.num_hosts(), envs.process_id(),
                       envs.join_timeout())


def _several_hosts() -> bool:
    from xla_inference import envs

    return envs.num_hosts() > 1


def _log_checkpoint_reads() -> None:
    """How much of the checkpoint this process read (multi-host: its devices' slices)."""
    import jax

    from xla_inference.loading.safetensors import CHECKPOINT_READS

    if _several_hosts():
        logger.info("xla-inference: process %d read %d bytes of checkpoint tensors (its "
                    "devices' slices)", jax.process_index(), CHECKPOINT_READS.bytes)


def _dtype_name(torch_dtype: torch.dtype) -> str:
    table = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if torch_dtype not in table:
        raise ValueError(f"xla-inference does not support dtype {torch_dtype}")
    return table[torch_dtype]


# An fp8 KV cache is described to vLLM as vLLM's own GPU workers describe one: uint8, one
# byte per value, so that it sizes pages (and counts blocks) for 1-byte elements.
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float8_e4m3fn": torch.uint8, "float8_e5m2": torch.uint8}


def _top_logprobs_width(max_logprobs: int, vocab_size: int) -> tuple[int, bool]:
    """(top logprobs the usual sampler computes, whether to compile the whole-vocabulary
    variant too). vLLM's max_logprobs -1 (or one the vocabulary's size or more) allows any
    number up to the whole vocabulary: requests up to vLLM's default 20 keep the cheap top-k
    program and the rest sort the whole row, in a program compiled only for that setting."""
    if max_logprobs == -1 or max_logprobs >= vocab_size:
        return min(20, vocab_size), True
    return (max_logprobs if max_logprobs > 0 else min(20, vocab_size)), False


def kv_cache_spec(layer, block_size: int, dtype: torch.dtype):
    """vLLM's spec for one layer's cache (models/interface.KvLayer), faithfully: vLLM frees
    the pages a sliding-window layer no longer reads, and gives layers of different kinds
    their own KV cache groups (block tables)."""
    from xla_inference.models.interface import MLA, SLIDING

    shape = dict(block_size=block_size, num_kv_heads=layer.num_kv_heads,
                 head_size=layer.head_size, dtype=dtype)
    if layer.kind == MLA:
        return MLAAttentionSpec(**shape)
    if layer.kind == SLIDING:
        return SlidingWindowSpec(**shape, sliding_window=layer.sliding_window)
    return FullAttentionSpec(**shape)


def _layer_name(i: int) -> str:
    return f"model.layers.{i}.self_attn.attn"


def kv_layout(kv_cache_config, num_layers: int, block_size: int, layer_name=_layer_name
              ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """vLLM's KV cache config -> (group, cache array set) of each layer
    (runner/engine.EngineConfig). Layers that vLLM places at the same bytes of its one
    backing allocation (one layer of each group: a page is one group's at a time) share a
    set of arrays; each set holds every page."""
    group_of = {}
    for g, group in enumerate(kv_cache_config.kv_cache_groups):
        if group.kv_cache_spec.block_size != block_size:
            raise ValueError(f"KV cache group {g} has pages of {group.kv_cache_spec.block_size} "
                             f"tokens; xla-inference uses one page size ({block_size})")
        group_of.update(dict.fromkeys(group.layer_names, g))
    start_of = {name: tensor.offset + i * tensor.layer_stride
                for tensor in kv_cache_config.kv_cache_tensors
                for i, name in enumerate(tensor.layers)}
    names = [layer_name(i) for i in range(num_layers)]
    missing = [n for n in names if n not in group_of or n not in start_of]
    if missing:
        raise ValueError(f"vLLM's KV cache config places no cache for {missing}")
    starts = sorted({start_of[n] for n in names})
    return (tuple(group_of[n] for n in names),
            tuple(starts.index(start_of[n]) for n in names))


def _group_page_bytes(group) -> int:
    """Bytes of one page over all the layers of a KV cache group."""
    if isinstance(group.kv_cache_spec, UniformTypeKVCacheSpecs):  # its own sum over the layers
        return group.kv_cache_spec.page_size_bytes
    return len(group.layer_names) * group.kv_cache_spec.page_size_bytes


def model_implementation(model_config) -> str:
    """vLLM's --model-impl, resolved: "native" (a JAX family of ours, models/) or "vllm"
    (vLLM's PyTorch model class lowered through torchax, torch_models/). "auto" serves our
    family where we have one and vLLM's class otherwise; the choice is logged."""
    from xla_inference.models.registry import native_family

    asked = str(model_config.model_impl)
    architectures = list(model_config.architectures or [])
    family = native_family(architectures)
    if asked not in ("auto", "native", "vllm"):
        raise ValueError(f"xla-inference serves --model-impl auto, native or vllm, not {asked!r}")
    chosen = asked if asked != "auto" else ("native" if family is not None else "vllm")
    if chosen == "native" and family is None:
        raise ValueError(f"--model-impl native: xla-inference has no JAX family for "
                         f"{architectures}; --model-impl auto or vllm serves it through vLLM's "
                         "PyTorch model class")
    logger.info("xla-inference: --model-impl %s: %s for %s", asked,
                f"native JAX family {family.name}" if chosen == "native"
                else "vLLM's PyTorch model class through torchax", architectures)
    return chosen


class XlaWorker(WorkerBase):
    def __init__(self, vllm_config, local_rank, rank, distributed_init_method,
                 is_driver_worker=False):
        super().__init__(vllm_config, local_rank, rank, distributed_init_method, is_driver_worker)
        patch_vllm_config()  # the engine core re-checks its VllmConfig after start-up
        # Before the engine core builds its scheduler (and so its connector side).
        size_offload_tier_for_one_process(vllm_config)
        _tolerate_missing_accelerator()
        _route_logs_through_vllm()
        self.model = None  # runner.build.LoadedModel, from load_model until the engine is built
        self.model_runner = None
        self.precision = None  # runner.build.Precision, from init_device
        self.loaded_weight_bytes = None  # host bytes of the weights as loaded (load_model)
        self.draft_model = None  # speculative decoding's draft model (method draft_model)

    # -- startup ----------------------------------------------------------------------------
    def init_device(self) -> None:
        from xla_inference.runner.build import Precision
        from xla_inference.runner.jax_setup import configure_jax

        _join_hosts()
        devices = configure_jax()
        self.device = torch.device("cpu")
        self.precision = Precision.for_platform(
            _dtype_name(self.model_config.dtype), devices[0].platform,
        ).with_kv_cache(self.cache_config.cache_dtype, devices[0].platform)
        logger.info("xla-inference: JAX devices %s; precision %s", devices, self.precision)

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        """Phase one (runner/build.py): the weights on the host. `load_dummy_weights` or
        `--load-format dummy`: random weights of the checkpoint's shapes. vLLM's
        quantization method (the checkpoint's, or --quantization) goes to the loader under
        its format's name (plugin/quantization.py): it keeps a quantized checkpoint's
        projections quantized, or quantizes an unquantized one's online."""
        from xla_inference.runner.build import load

        start = time.perf_counter()
        mc = self.model_config
        dummy = load_dummy_weights or self.load_config.load_format == "dummy"
        self.draft_model = load_draft_model(self.vllm_config, self.precision, dummy)
        if mc.runner_type == "pooling" and mc.attn_type != "encoder_only":
            self._load_pooling_model(dummy, loader_method(mc.quantization))
            return
        # Encoder-only pooling models (BERT-style embedders) have no native family: vLLM's
        # class through torchax, its attention layers cache-free (torch_models/attention.py).
        if mc.runner_type == "pooling" or model_implementation(mc) == "vllm":
            from xla_inference import envs
            from xla_inference.torch_models.loader import load as load_torch_model

            if envs.num_hosts() > 1 and self.vllm_config.lora_config is not None:
                # Each process places its shards of the torch path's weights as the native
                # path's (parallel/sharding.place); its LoRA slots have not run across them.
                raise ValueError("xla-inference does not serve LoRA adapters on its torch path "
                                 "(vLLM's PyTorch model classes) across several JAX processes "
                                 "(XLA_INFERENCE_HOSTS > 1) yet; native families serve them "
                                 "there")
            if pipeline_parallel_size(self.vllm_config) > 1:
                raise ValueError("xla-inference's torch path (--model-impl vllm) does not run "
                                 "pipeline parallel yet; use --tensor-parallel-size")
            if dummy:
                self.load_config.load_format = "dummy"
            from xla_inference.parallel.sharding import build_mesh

            # The mesh initialize_from_config's build_engine will build: the torch path
            # places each layer on it as the layer loads.
            mesh = build_mesh(self.parallel_config.tensor_parallel_size,
                              data_parallel_size(self.vllm_config))
            self.model = load_torch_model(self.vllm_config, self.precision, mesh=mesh)
            self.loaded_weight_bytes = self.model.weight_bytes
            return
        quantization = loader_method(mc.quantization)
        # Across hosts each process reads from the checkpoint only its devices' slices, at
        # placement (runner/build.load's reads_slices); one process reads as before.
        self.model = load(self._checkpoint(weights=not dummy), self.precision,
                          random_seed=(mc.seed or 0) if dummy else None,
                          quantization=quantization, reads_slices=_several_hosts())
        self.model = prepare_target(self.vllm_config, self.model, self.draft_model)
        self.loaded_weight_bytes = self.model.weight_bytes
        logger.info("xla-inference: loaded %s%s (%s%s; %.1f MiB of weights) in %.1fs", mc.model,
                    " as random weights" if dummy else "", self.precision,
                    f", quantization {quantization}" if quantization else "",
                    self.loaded_weight_bytes / (1 << 20), time.perf_counter() - start)

    def _load_pooling_model(self, dummy: bool, quantization: str | None) -> None:
        """vLLM's pooling runner (--runner pooling, --convert embed|classify) on a native
        decoder family: its weights and, for a classifier, the score layer."""
        from xla_inference.runner.build import load_pooling

        if dummy or quantization:
            raise ValueError("xla-inference serves pooling models from unquantized checkpoints "
                             "(no --load-format dummy, no quantization)")
        self.model = load_pooling(self._checkpoint(), self.precision)
        self.loaded_weight_bytes = self.model.weight_bytes

    def _checkpoint(self, weights: bool = True) -> str:
        """The served model's local checkpoint (a hub id fetched as vLLM would)."""
        from xla_inference.loading.hub import local_checkpoint

        mc = self.model_config
        return local_checkpoint(mc.model, mc.revision, self.load_config.download_dir,
                                weights=weights)

    def get_kv_cache_spec(self) -> dict:
        """Every attention layer's cache: the target's, and a draft model's beside them (vLLM
        sizes and groups them together; a request's pages serve both)."""
        specs = {_layer_name(i): kv_cache_spec(layer, self.cache_config.block_size,
                                               self._kv_torch_dtype())
                 for i, layer in enumerate(self.model.kv_layers())}
        if self.draft_model is not None:
            specs.update({draft_layer_name(i): kv_cache_spec(layer, self.cache_config.block_size,
                                                             self._kv_torch_dtype())
                          for i, layer in enumerate(self.draft_model.kv_layers())})
        return specs

    def get_supported_kv_cache_layouts(self) -> list[str]:
        return ["LBNHC"]

    def set_kv_cache_layout(self, kv_cache_layout: str) -> None:
        """The engine core's choice among get_supported_kv_cache_layouts (ours, LBNHC, is
        fixed), recorded as vLLM's workers record it: vLLM's KV cache grouping, which
        _max_useful_kv_bytes calls, reads it."""
        super().set_kv_cache_layout(kv_cache_layout)

    def determine_available_memory(self) -> int:
        """Bytes for the KV cache: a `gpu_memory_utilization` share of host memory, less what
        this process already holds and a workspace, capped at what the scheduler can use."""
        if self.cache_config.kv_cache_memory_bytes:
            return int(self.cache_config.kv_cache_memory_bytes)
        total = psutil.virtual_memory().total
        budget = total * self.cache_config.gpu_memory_utilization
        # Weights not read yet (multi-host: read at placement) will be held too; counted whole
        # (this process holds its devices' share: a conservative bound).
        in_use = psutil.Process().memory_info().rss + getattr(self.model, "unread_bytes", 0)
        free_now = psutil.virtual_memory().available - _WORKSPACE_BYTES
        available = int(min(budget - in_use - _WORKSPACE_BYTES, free_now))
        useful = self._max_useful_kv_bytes()
        if available <= 0:
            raise RuntimeError(
                f"no host memory left for the KV cache: {budget / _GiB:.1f} GiB allowed by "
                f"gpu_memory_utilization, {in_use / _GiB:.1f} GiB in use; raise "
                "gpu_memory_utilization or set kv_cache_memory_bytes")
        if available > useful:
            logger.info("xla-inference: KV cache capped at %.2f GiB (max_num_seqs x max_model_len)",
                        useful / _GiB)
        return min(available, useful)

    def _kv_torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.precision.kv_cache.name]

    def _max_useful_kv_bytes(self) -> int:
        """Bytes of the pages max_num_seqs requests of max_model_len can hold at once, in the
        KV cache groups vLLM will make of get_kv_cache_spec: a request takes the pages of
        every group (a sliding window's group only those of its window and one step), all
        from one pool whose page spans one layer of each group slot."""
        from vllm.v1.core.kv_cache_utils import get_kv_cache_groups

        groups = get_kv_cache_groups(self.vllm_config, self.get_kv_cache_spec())
        # A page of the pool: the widest group's layers (groups share the memory).
        page_bytes = max(_group_page_bytes(group) for group in groups)
        pages_per_request = sum(cdiv(group.kv_cache_spec.max_memory_usage_bytes(self.vllm_config),
                                     group.kv_cache_spec.page_size_bytes) for group in groups)
        # Each data parallel replica schedules its own max_num_seqs, with its own null page.
        replicas = data_parallel_size(self.vllm_config)
        num_seqs = self.vllm_config.scheduler_config.max_num_seqs
        return replicas * (num_seqs * pages_per_request + 1) * page_bytes

    def initialize_from_config(self, kv_cache_config) -> None:
        from xla_inference.runner.build import build_engine
        from xla_inference.runner.engine import EngineConfig

        sc = self.vllm_config.scheduler_config
        layer_groups, layer_arrays = kv_layout(kv_cache_config, len(self.model.kv_layers()),
                                               self.cache_config.block_size)
        top_logprobs, whole_vocab_logprobs = _top_logprobs_width(self.model_config.max_logprobs,
                                                                 self.model.vocab_size)
        engine_cfg = EngineConfig(
            num_blocks=kv_cache_config.num_blocks, block_size=self.cache_config.block_size,
            max_num_tokens=sc.max_num_batched_tokens, max_num_seqs=sc.max_num_seqs,
            max_model_len=self.model_config.max_model_len, seed=self.model_config.seed or 0,
            max_logprobs=top_logprobs, whole_vocab_logprobs=whole_vocab_logprobs,
            layer_groups=layer_groups, layer_arrays=layer_arrays,
            num_speculative_tokens=num_speculative_tokens(self.vllm_config))
        engine = build_engine(self.model, engine_cfg,
                              tensor_parallel_size=self.parallel_config.tensor_parallel_size,
                              data_parallel_size=data_parallel_size(self.vllm_config),
                              pipeline_parallel_size=pipeline_parallel_size(self.vllm_config),
                              lora=self._lora_limits(),
                              pooling=self.model_config.runner_type == "pooling",
                              expert_parallel=self.parallel_config.enable_expert_parallel)
        _log_checkpoint_reads()
        drafter = build_drafter(self.vllm_config, self.draft_model, kv_cache_config, engine)
        if hasattr(drafter, "proposes"):  # a host-side proposer: a follower's is never read
            drafter.proposes = self.is_driver_worker
        self.model_runner = XlaModelRunner(engine, drafter, pooling=self._pooling_requests(),
                                           kv_connector=self._kv_connector(kv_cache_config, engine),
                                           pixel_affine=mm_pixel_affine(self.model_config))
        self._overlap_async_steps(engine, drafter)
        logger.info("xla-inference: KV cache of %d pages x %d tokens in %d groups (%d sets of "
                    "arrays for %d layers); token buckets %s; mesh %s", engine_cfg.num_blocks,
                    engine_cfg.block_size, engine_cfg.num_groups, 1 + max(layer_arrays, default=-1),
                    len(layer_arrays), engine.token_buckets, dict(engine.mesh.shape))

    def _overlap_async_steps(self, engine, drafter) -> None:
        """Under async scheduling in one engine process, sampled tokens stay on device until
        vLLM takes them (plugin/async_output.py). Not across JAX processes (the followers
        replay the driver's calls; the driver alone sends vLLM outputs) nor with a drafter
        or a KV connector (they read each step's tokens on the host)."""
        runner = self.model_runner
        runner.async_output = bool(
            self.vllm_config.scheduler_config.async_scheduling and not _several_hosts()
            and engine.can_feed_tokens and drafter is None and runner.kv_connector is None)
        engine.feeds_tokens = runner.async_output

    def _kv_connector(self, kv_cache_config, engine):
        """The KV connector's worker side, created here: vLLM's own set-up broadcasts over
        torch process groups this platform does not create. None without one."""
        if self.vllm_config.kv_transfer_config is None:
            return None
        from xla_inference.kv_transfer.steps import KvConnectorSteps

        return KvConnectorSteps.build(self.vllm_config, kv_cache_config, engine)

    def _lora_limits(self) -> dict | None:
        """--enable-lora's slots (max_loras), rank (max_lora_rank) and host cache
        (max_cpu_loras) for the engine's adapter stacks (lora/slots.py); None without it."""
        lc = self.vllm_config.lora_config
        if lc is None:
            return None
        return dict(max_loras=lc.max_loras, max_rank=lc.max_lora_rank,
                    max_cpu_loras=lc.max_cpu_loras or lc.max_loras,
                    target_modules=lc.target_modules)

    def compile_or_warm_up_model(self) -> CompilationTimes:
        engine = self.model_runner.engine
        logger.info("xla-inference: compiling %d buckets before serving", len(engine.token_buckets))
        # Raw pixels (uint8) come exactly when the runner has their normalization to apply.
        seconds = engine.warm_up(self._image_grids(),
                                 raw_pixels=self.model_runner.pixel_affine is not None)
        if self.model_runner.drafter is not None:
            seconds += self.model_runner.drafter.warm_up() or 0.0
        if self.model_runner.kv_connector is not None:
            seconds += self._warm_up_kv_connector()
        logger.info("xla-inference: warm-up done in %.1fs", seconds)
        return CompilationTimes(language_model=seconds, encoder=0.0)

    def _warm_up_kv_connector(self) -> float:
        """Compile the KV copy programs, inside the warm-up (the compile counter's)."""
        from xla_inference.runner import compile_counter

        start = time.perf_counter()
        compile_counter.mark_warm(done=False)
        self.model_runner.kv_connector.warm_up()
        compile_counter.mark_warm()
        return time.perf_counter() - start

    def _image_grids(self) -> list[tuple[int, int, int]]:
        """The processor's grids of the images sizes XLA_INFERENCE_IMAGE_SIZES names, for a
        model whose images we encode (plugin/platform.served_modalities)."""
        from xla_inference import envs
        from xla_inference.plugin.platform import served_modalities

        sizes = envs.image_sizes()
        if not sizes or "image" not in served_modalities(self.model_config):
            return []
        from PIL import Image
        from vllm.multimodal import MULTIMODAL_REGISTRY

        info = MULTIMODAL_REGISTRY.create_processor(self.model_config).info
        image_processor = info.get_hf_processor().image_processor
        grids = []
        for height, width in sizes:
            out = image_processor(images=[Image.new("RGB", (width, height))], return_tensors="np")
            if "image_grid_thw" not in out:  # one size for every image (Gemma 3): warmed anyway
                continue
            grids.append(tuple(int(g) for g in out["image_grid_thw"][0]))
        return grids

    def _pooling_requests(self):
        if self.model_config.runner_type != "pooling":
            return None
        from xla_inference.plugin.pooling import PoolingRequests, pooling_setup

        setup = pooling_setup(self.model_config, self.model.score_weight)
        logger.info("xla-inference: pooling model, %s pooling, tasks %s", setup.seq_pooling_type,
                    setup.tasks)
        return PoolingRequests(setup)

    def get_supported_tasks(self):
        if self.model_config.runner_type == "pooling":
            from xla_inference.plugin.pooling import pooling_setup

            return pooling_setup(self.model_config, self.model.score_weight).tasks
        return ("generate",)

    # -- serving ----------------------------------------------------------------------------
    def execute_model(self, scheduler_output):
        return self.model_runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar_output):
        return self.model_runner.sample_tokens(grammar_output)

    # -- LoRA adapters (vLLM's add/remove/pin/list_loras; --enable-lora) ---------------------
    def add_lora(self, lora_request) -> bool:
        """Read the adapter (errors name the adapter_config field) into the host cache; a
        step that uses it writes it into a device slot. A refusal of the adapter carries
        ADAPTER_REFUSED in its message, the one thing of it that reaches the front end
        across processes (plugin/lora_requests.py tells it from other failures by that)."""
        from xla_inference.lora.peft import LoraError
        from xla_inference.plugin.lora_requests import ADAPTER_REFUSED

        try:
            return self.model_runner.add_lora(lora_request)
        except LoraError as error:
            raise LoraError(f"{ADAPTER_REFUSED}{error}") from error

    def remove_lora(self, lora_id: int) -> bool:
        return self.model_runner.lora_slots().remove(lora_id)

    def pin_lora(self, lora_id: int) -> bool:
        return self.model_runner.lora_slots().pin(lora_id)

    def list_loras(self) -> set[int]:
        return self.model_runner.lora_slots().ids()

    def lora_slot_writes(self) -> int:
        """Adapters written into device slots so far (tests: evictions happened)."""
        return self.model_runner.lora_slots().slot_writes

    def take_draft_token_ids(self):
        return self.model_runner.take_draft_token_ids()

    # -- vLLM's profiler routes (/start_profile, /stop_profile; --profiler-config) -----------
    def profile(self, is_start: bool = True, profile_prefix: str | None = None) -> None:
        """JAX's profiler (XLA's trace of the host and the device, for TensorBoard's profile
        plugin or Perfetto) into --profiler-config's torch_profiler_dir (in a folder named
        by the caller's prefix, if it gives one); vLLM's front end writes its own CPU trace
        there too."""
        import os

        import jax

        if is_start:
            folder = os.path.join(self.vllm_config.profiler_config.torch_profiler_dir,
                                  profile_prefix or "")
            jax.profiler.start_trace(folder)
            logger.info("xla-inference: JAX profiler tracing into %s", folder)
        else:
            jax.profiler.stop_trace()

    # -- sleep mode: not served (vLLM refuses --enable-sleep-mode for this platform) -------
    # The dev-mode routes still reach the worker; as vLLM's CPU worker, they keep the
    # weights and cache where they are, rather than fail /wake_up and leave the scheduler
    # paused.
    def sleep(self, level: int = 1) -> None:
        logger.warning("xla-inference: sleep mode is not supported; the weights and the KV "
                       "cache stay in memory")

    def wake_up(self, tags: list[str] | None = None) -> None:
        logger.warning("xla-inference: sleep mode is not supported; nothing to wake up")

    def discard(self, tags: tuple[str, ...]) -> None:
        raise RuntimeError("xla-inference does not release the KV cache's or the weights' "
                           "memory (sleep mode is not supported)")

    def async_step_counts(self) -> tuple[int, int, int]:
        """Steps whose tokens stayed on device, steps fed those tokens, and steps whose
        program sampled its own tokens (tests)."""
        runner = self.model_runner
        return runner.steps_sampled_on_device, runner.steps_fed, runner.steps_sampled_by_forward

    def num_compilations(self) -> int:
        """XLA executables built in this process so far (tests check none appear after warm-up)."""
        from xla_inference.runner import compile_counter

        return compile_counter.num_compilations()

    def step_stats(self) -> dict:
        """Host/device time split since the last call (XLA_INFERENCE_STEP_STATS=1), and resets it."""
        return self.model_runner.engine.stats.report()

    def drafter_quantized_weights(self) -> int:
        """Quantized weights (packed projections, expert stacks) of an EAGLE head's or MTP
        layer's params on the device (tests)."""
        import jax

        from xla_inference.quantization.experts import PackedExperts
        from xla_inference.quantization.packed import PackedWeight

        quantized = (PackedWeight, PackedExperts)
        leaves = jax.tree.leaves(self.model_runner.drafter.proposer.params,
                                 is_leaf=lambda leaf: isinstance(leaf, quantized))
        return sum(isinstance(leaf, quantized) for leaf in leaves)

    def replica_rows(self) -> list[int]:
        """Request rows each data parallel replica has run so far (tests)."""
        return self.model_runner.engine.rows_per_replica.tolist()

    def kv_cache_groups(self) -> dict:
        """The engine's KV cache groups (tests): each layer's group and array set, and the
        null pages vLLM handed over per group so far."""
        cfg = self.model_runner.engine.cfg
        return dict(num_groups=cfg.num_groups, layer_groups=list(cfg.layer_groups),
                    layer_arrays=list(cfg.layer_arrays),
                    null_pages_received=list(self.model_runner.null_pages_received))

    def weight_bytes(self) -> int | None:
        """Host bytes of the weights as loaded, before placement (quantized projections as
        packed: values, scales and offsets); None before load_model."""
        return self.loaded_weight_bytes

    def get_model(self):
        """vLLM's LLM.apply_model(fn) runs fn on this (a torch nn.Module, in vLLM's own
        workers). There is none here: the model is a compiled JAX program whose weights are
        JAX arrays, on the torch path too (vLLM's module was lowered once and its weights
        moved); a function given one would see none of the served weights. Refused naming
        that, where the base class raised a bare NotImplementedError."""
        raise NotImplementedError(
            "xla-inference serves the model as a compiled JAX program with its weights in JAX "
            "arrays, not as a torch nn.Module, so LLM.apply_model has no module to run on; "
            "repr(llm) describes the served model")

    def get_model_inspection(self) -> str:
        """vLLM's LLM.__repr__ asks every worker for a view of the model; the base class
        formats a torch module, which the native path does not have (unanswered, a
        follower across hosts would stop the engine): the architecture, the JAX family that
        serves it, its parameter arrays and the mesh."""
        import jax

        name = ", ".join(self.model_config.architectures or ()) or str(self.model_config.model)
        engine = getattr(self.model_runner, "engine", None)
        if engine is None:
            return f"{name} (xla-inference: no engine built yet)"
        leaves = jax.tree.leaves(engine.params)
        mib = sum(getattr(leaf, "nbytes", 0) for leaf in leaves) / 2**20
        return (f"{name} served by xla-inference: JAX family {engine.model.name}, "
                f"{len(leaves)} parameter arrays ({mib:.1f} MiB), mesh {dict(engine.mesh.shape)}")

    def mesh_shape(self) -> dict:
        return dict(self.model_runner.engine.mesh.shape)

    def mesh_processes(self) -> list:
        """The JAX process of every device in the mesh's grid (multi-host: which host holds
        which stage or shard)."""
        return [d.process_index for d in self.model_runner.engine.mesh.devices.flat]

    def synchronize_device(self) -> None:
        """JAX results are waited on when they are read."""

    def shutdown(self) -> None:
        if self.model_runner is not None and self.model_runner.kv_connector is not None:
            self.model_runner.kv_connector.shutdown()
        self.model_runner = None
        self.model = None

    # -- calls vLLM makes that have little or nothing to do here -----------------------------
    def reset_encoder_cache(self) -> None:
        """vLLM clears the encoder outputs (image embeddings) it cached, after a weight update
        or when a pause clears the caches: ours go too."""
        if self.model_runner is not None:
            self.model_runner.engine.encoder_cache.clear()

    def update_max_model_len(self, max_model_len: int) -> None:
        """--max-model-len -1: vLLM set the checkpoint's context length, then, having sized
        the KV cache, shortened it to what the cache holds for one sequence; it tells the
        workers between determine_available_memory and initialize_from_config. The engine is
        built from model_config there, so it follows. An engine already built serves any
        shorter length (its block tables are wider than needed) but not a longer one."""
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {max_model_len}")
        built = self.served_max_model_len()
        if built is not None and max_model_len > built:
            raise ValueError(f"cannot raise max_model_len to {max_model_len}: the engine was "
                             f"built and compiled for at most {built} tokens")
        self.model_config.max_model_len = max_model_len
        logger.info("xla-inference: max_model_len %d", max_model_len)

    def served_max_model_len(self) -> int | None:
        """The context length the engine was built for (None before initialize_from_config)."""
        return None if self.model_runner is None else self.model_runner.engine.cfg.max_model_len

    def get_kv_connector_handshake_metadata(self) -> dict | None:
        """vLLM collects each worker's KV-transfer handshake when a KV connector is
        configured: {(pp rank, tp rank): metadata}, or None where the connector exchanges
        none (the shared-storage one) or none is configured."""
        connector = self.model_runner.kv_connector if self.model_runner else None
        return None if connector is None else connector.handshake_metadata()

    def kv_load_failure(self, remote_request_id: str) -> str | None:
        """Why the KV of a remote prefill (the prefill server's request id) failed to load
        here; the server's front-end asks (kv_transfer/load_errors.py)."""
        connector = self.model_runner.kv_connector if self.model_runner else None
        return None if connector is None else connector.load_failure(remote_request_id)

    def kv_transfer_counts(self) -> dict:
        """What the KV connector moved so far (tests): requests and tokens loaded and saved."""
        connector = self.model_runner.kv_connector if self.model_runner else None
        return {} if connector is None else connector.counts()

    def kv_transfer_counts_by_process(self) -> list[dict]:
        """kv_transfer_counts of each JAX process (the driver's, then each follower's as of
        its last step; one entry in one process)."""
        connector = self.model_runner.kv_connector if self.model_runner else None
        return [] if connector is None else connector.counts_by_process()
