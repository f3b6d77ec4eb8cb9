"""The vLLM Worker: one process that drives every local JAX device."""

import logging
import math
import time

import psutil
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec
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


def _jnp_dtype(torch_dtype: torch.dtype):
    import jax.numpy as jnp

    table = {torch.float32: jnp.float32, torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16}
    if torch_dtype not in table:
        raise ValueError(f"xla-inference does not support dtype {torch_dtype}")
    return table[torch_dtype]


def _weights_only_narrow(dtype: torch.dtype, devices) -> bool:
    """dtype=bfloat16 on the host CPU means bfloat16 projection matrices, whose products
    take bfloat16 inputs and accumulate in float32 (layers/linear.py), and float32 for the
    rest: activations, norms, attention, the KV cache. XLA's CPU backend is fast at those
    products (twice float32's rate with avx512_bf16; a batch-1 step reads half the bytes)
    and slow at bfloat16 elementwise work (a step wholly in bfloat16 ran ~15x slower).
    Accelerators run bfloat16 throughout."""
    return dtype == torch.bfloat16 and all(d.platform == "cpu" for d in devices)


def _top_logprobs_width(max_logprobs: int, vocab_size: int) -> int:
    """How many top logprobs the sampler computes: vLLM's max_logprobs (-1, the whole
    vocabulary, is refused per request, so the default 20 stands in)."""
    return min(max_logprobs, vocab_size) if max_logprobs > 0 else min(20, vocab_size)


class XlaWorker(WorkerBase):
    def __init__(self, vllm_config, local_rank, rank, distributed_init_method,
                 is_driver_worker=False):
        super().__init__(vllm_config, local_rank, rank, distributed_init_method, is_driver_worker)
        patch_vllm_config()  # the engine core re-checks its VllmConfig after start-up
        _tolerate_missing_accelerator()
        _route_logs_through_vllm()
        self.model = None  # (module, config, params)
        self.model_runner = None
        self._weights_only = False  # bfloat16 weights, float32 arithmetic (init_device)

    # -- startup ----------------------------------------------------------------------------
    def init_device(self) -> None:
        from xla_inference.runner.jax_setup import configure_jax

        devices = configure_jax()
        self.device = torch.device("cpu")
        self._weights_only = _weights_only_narrow(self.model_config.dtype, devices)
        logger.info("xla-inference: JAX devices %s", devices)

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        from xla_inference.loading.params import narrow_projections
        from xla_inference.models.loader import load_model

        start = time.perf_counter()
        mc = self.model_config
        # bfloat16 weights on the host CPU: load in float32, then narrow the projections
        module, cfg, params = load_model(mc.model, _jnp_dtype(self._kv_torch_dtype()))
        if self._weights_only:
            params = narrow_projections(params, _jnp_dtype(mc.dtype))
        self.model = (module, cfg, params)
        logger.info("xla-inference: loaded %s (%s%s) in %.1fs", mc.model, mc.dtype,
                    " projections, float32 elsewhere" if self._weights_only else "",
                    time.perf_counter() - start)

    def _kv_layer_shapes(self) -> list[tuple[int, int, int]]:
        """Each layer's K (and V) array for one page, [block_size, kv heads, head size], as the
        engine allocates it from the model's kv_cache_shape (MLA's is not num_kv_heads x
        head_dim: models/deepseek_v3.py)."""
        module, cfg, _ = self.model
        return module.kv_cache_shape(cfg, self.cache_config.block_size)

    def get_kv_cache_spec(self) -> dict:
        return {f"model.layers.{i}.self_attn.attn": FullAttentionSpec(
                    block_size=self.cache_config.block_size, num_kv_heads=num_kv_heads,
                    head_size=head_size, dtype=self._kv_torch_dtype())
                for i, (_, num_kv_heads, head_size) in enumerate(self._kv_layer_shapes())}

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
        """The KV cache's dtype, which is also the activations' (float32 for bfloat16
        projections on the host CPU)."""
        return torch.float32 if self._weights_only else self.model_config.dtype

    def _page_bytes(self) -> int:
        itemsize = torch.tensor([], dtype=self._kv_torch_dtype()).element_size()
        return sum(2 * math.prod(shape) * itemsize for shape in self._kv_layer_shapes())

    def _max_useful_kv_bytes(self) -> int:
        sc = self.vllm_config.scheduler_config
        pages_per_seq = math.ceil(self.model_config.max_model_len / self.cache_config.block_size)
        # Each data parallel replica schedules its own max_num_seqs, with its own null page.
        replicas = data_parallel_size(self.vllm_config)
        return replicas * (sc.max_num_seqs * pages_per_seq + 1) * self._page_bytes()

    def initialize_from_config(self, kv_cache_config) -> None:
        from xla_inference.parallel.sharding import build_mesh
        from xla_inference.runner.engine import EngineConfig, ModelEngine

        module, cfg, params = self.model
        sc = self.vllm_config.scheduler_config
        engine_cfg = EngineConfig(
            num_blocks=kv_cache_config.num_blocks, block_size=self.cache_config.block_size,
            max_num_tokens=sc.max_num_batched_tokens, max_num_seqs=sc.max_num_seqs,
            max_model_len=self.model_config.max_model_len, seed=self.model_config.seed or 0,
            max_logprobs=_top_logprobs_width(self.model_config.max_logprobs, cfg.vocab_size))
        mesh = build_mesh(self.parallel_config.tensor_parallel_size,
                          data_parallel_size(self.vllm_config))
        engine = ModelEngine(module, cfg, params, engine_cfg, _jnp_dtype(self._kv_torch_dtype()),
                             mesh=mesh)
        self.model = (module, cfg, None)  # the engine holds the placed params; drop the host copy
        self.model_runner = XlaModelRunner(engine)
        logger.info("xla-inference: KV cache of %d pages x %d tokens; token buckets %s; mesh %s",
                    engine_cfg.num_blocks, engine_cfg.block_size, engine.token_buckets,
                    dict(mesh.shape))

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
