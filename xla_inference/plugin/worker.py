"""The vLLM Worker: one process that drives every local JAX device."""

import logging
import time

import psutil
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec
from vllm.v1.worker.worker_base import CompilationTimes, WorkerBase

from xla_inference.plugin.model_runner import XlaModelRunner
from xla_inference.plugin.platform import data_parallel_size, patch_vllm_config

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


def _dtype_name(torch_dtype: torch.dtype) -> str:
    table = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if torch_dtype not in table:
        raise ValueError(f"xla-inference does not support dtype {torch_dtype}")
    return table[torch_dtype]


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _top_logprobs_width(max_logprobs: int, vocab_size: int) -> tuple[int, bool]:
    """(top logprobs the usual sampler computes, whether to compile the whole-vocabulary
    variant too). vLLM's max_logprobs -1 (or one the vocabulary's size or more) allows any
    number up to the whole vocabulary: requests up to vLLM's default 20 keep the cheap top-k
    program and the rest sort the whole row, in a program compiled only for that setting."""
    if max_logprobs == -1 or max_logprobs >= vocab_size:
        return min(20, vocab_size), True
    return (max_logprobs if max_logprobs > 0 else min(20, vocab_size)), False


def kv_cache_spec(layer, block_size: int, dtype: torch.dtype):
    """vLLM's spec for one layer's cache (models/interface.KvLayer). Every layer is reported
    as full attention for now: the engine gives all layers one block table."""
    from xla_inference.models.interface import MLA

    if layer.kind == MLA:
        return MLAAttentionSpec(block_size=block_size, num_kv_heads=layer.num_kv_heads,
                                head_size=layer.head_size, dtype=dtype)
    return FullAttentionSpec(block_size=block_size, num_kv_heads=layer.num_kv_heads,
                             head_size=layer.head_size, dtype=dtype)


class XlaWorker(WorkerBase):
    def __init__(self, vllm_config, local_rank, rank, distributed_init_method,
                 is_driver_worker=False):
        super().__init__(vllm_config, local_rank, rank, distributed_init_method, is_driver_worker)
        patch_vllm_config()  # the engine core re-checks its VllmConfig after start-up
        _tolerate_missing_accelerator()
        _route_logs_through_vllm()
        self.model = None  # runner.build.LoadedModel, from load_model until the engine is built
        self.model_runner = None
        self.precision = None  # runner.build.Precision, from init_device

    # -- startup ----------------------------------------------------------------------------
    def init_device(self) -> None:
        from xla_inference.runner.build import Precision
        from xla_inference.runner.jax_setup import configure_jax

        devices = configure_jax()
        self.device = torch.device("cpu")
        self.precision = Precision.for_platform(_dtype_name(self.model_config.dtype),
                                                devices[0].platform)
        logger.info("xla-inference: JAX devices %s; precision %s", devices, self.precision)

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        """Phase one (runner/build.py): the weights on the host. `load_dummy_weights` or
        `--load-format dummy`: random weights of the checkpoint's shapes."""
        from xla_inference.runner.build import load

        start = time.perf_counter()
        mc = self.model_config
        dummy = load_dummy_weights or self.load_config.load_format == "dummy"
        self.model = load(mc.model, self.precision,
                          random_seed=(mc.seed or 0) if dummy else None)
        logger.info("xla-inference: loaded %s%s (%s) in %.1fs", mc.model,
                    " as random weights" if dummy else "", self.precision,
                    time.perf_counter() - start)

    def get_kv_cache_spec(self) -> dict:
        return {f"model.layers.{i}.self_attn.attn": kv_cache_spec(layer, self.cache_config.block_size,
                                                                  self._kv_torch_dtype())
                for i, layer in enumerate(self.model.kv_layers())}

    def get_supported_kv_cache_layouts(self) -> list[str]:
        return ["LBNHC"]

    def set_kv_cache_layout(self, kv_cache_layout: str) -> None:
        """Our cache layout is fixed ([slots, kv_heads, head_dim] per layer)."""

    def determine_available_memory(self) -> int:
        """Bytes for the KV cache: a `gpu_memory_utilization` share of host memory, less what
        this process already holds and a workspace, capped at what the scheduler can use."""
        if self.cache_config.kv_cache_memory_bytes:
            return int(self.cache_config.kv_cache_memory_bytes)
        total = psutil.virtual_memory().total
        budget = total * self.cache_config.gpu_memory_utilization
        in_use = psutil.Process().memory_info().rss
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
        from xla_inference.runner.build import kv_pages_for

        block_size = self.cache_config.block_size
        # Each data parallel replica schedules its own max_num_seqs, with its own null page.
        pages = kv_pages_for(self.vllm_config.scheduler_config.max_num_seqs,
                             self.model_config.max_model_len, block_size,
                             data_parallel_size(self.vllm_config))
        return pages * self.model.kv_page_bytes(block_size)

    def initialize_from_config(self, kv_cache_config) -> None:
        from xla_inference.runner.build import build_engine
        from xla_inference.runner.engine import EngineConfig

        sc = self.vllm_config.scheduler_config
        top_logprobs, whole_vocab_logprobs = _top_logprobs_width(self.model_config.max_logprobs,
                                                                 self.model.vocab_size)
        engine_cfg = EngineConfig(
            num_blocks=kv_cache_config.num_blocks, block_size=self.cache_config.block_size,
            max_num_tokens=sc.max_num_batched_tokens, max_num_seqs=sc.max_num_seqs,
            max_model_len=self.model_config.max_model_len, seed=self.model_config.seed or 0,
            max_logprobs=top_logprobs, whole_vocab_logprobs=whole_vocab_logprobs)
        engine = build_engine(self.model, engine_cfg,
                              tensor_parallel_size=self.parallel_config.tensor_parallel_size,
                              data_parallel_size=data_parallel_size(self.vllm_config))
        self.model_runner = XlaModelRunner(engine)
        logger.info("xla-inference: KV cache of %d pages x %d tokens; token buckets %s; mesh %s",
                    engine_cfg.num_blocks, engine_cfg.block_size, engine.token_buckets,
                    dict(engine.mesh.shape))

    def compile_or_warm_up_model(self) -> CompilationTimes:
        engine = self.model_runner.engine
        logger.info("xla-inference: compiling %d buckets before serving", len(engine.token_buckets))
        seconds = engine.warm_up()
        logger.info("xla-inference: warm-up done in %.1fs", seconds)
        return CompilationTimes(language_model=seconds, encoder=0.0)

    def get_supported_tasks(self):
        return ("generate",)

    # -- serving ----------------------------------------------------------------------------
    def execute_model(self, scheduler_output):
        return self.model_runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar_output):
        return self.model_runner.sample_tokens(grammar_output)

    def num_compilations(self) -> int:
        """XLA executables built in this process so far (tests check none appear after warm-up)."""
        from xla_inference.runner import compile_counter

        return compile_counter.num_compilations()

    def step_stats(self) -> dict:
        """Host/device time split since the last call (XLA_INFERENCE_STEP_STATS=1), and resets it."""
        return self.model_runner.engine.stats.report()

    def replica_rows(self) -> list[int]:
        """Request rows each data parallel replica has run so far (tests)."""
        return self.model_runner.engine.rows_per_replica.tolist()

    def mesh_shape(self) -> dict:
        return dict(self.model_runner.engine.mesh.shape)

    def synchronize_device(self) -> None:
        """JAX results are waited on when they are read."""

    def shutdown(self) -> None:
        self.model_runner = None
        self.model = None

    # -- calls vLLM makes that have little or nothing to do here -----------------------------
    def reset_encoder_cache(self) -> None:
        """vLLM clears the encoder outputs (image embeddings) it cached, after a weight update
        or when a pause clears the caches. Nothing to clear: we serve text only and keep no
        encoder cache."""

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

    def get_kv_connector_handshake_metadata(self) -> None:
        """vLLM collects each worker's KV-transfer handshake when a KV connector is
        configured. This worker runs no connector (KV transfer between engines is not
        supported), so it has nothing to exchange."""
        return None
