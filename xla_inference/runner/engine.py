"""The device-side engine: parameters, the paged KV cache and the compiled step programs."""

import dataclasses
import functools
import logging
import math
import time
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.layers.sampler import sample
from xla_inference.runner import compile_counter
from xla_inference.runner.batch import SamplingBatch, StepBatch, empty_step_batch, greedy_sampling_batch
from xla_inference.runner.buckets import pick_bucket, seqs_for_tokens, token_buckets
from xla_inference.runner.requests import BatchLayout, RequestState, build_sampling_batch, build_step_batch

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    num_blocks: int  # KV pages, the null page 0 included
    block_size: int
    max_num_tokens: int  # per step (vLLM's max_num_batched_tokens)
    max_num_seqs: int
    max_model_len: int
    seed: int = 0

    @property
    def max_blocks_per_seq(self) -> int:
        return math.ceil(self.max_model_len / self.block_size)


def _forward_logits(model: ModuleType, cfg, params, kv_cache, batch: StepBatch):
    kv_cache, hidden = model.forward(params, kv_cache, batch, cfg)
    return kv_cache, model.compute_logits(params, hidden[batch.logits_indices])


def _sample_step(logits, sampling: SamplingBatch, base_key, step: jax.Array):
    return sample(logits, sampling, jax.random.fold_in(base_key, step))


class ModelEngine:
    """Owns params and KV cache; runs one ragged step at a time on padded buckets."""

    def __init__(self, model: ModuleType, model_cfg, params, engine_cfg: EngineConfig, kv_dtype):
        compile_counter.install()
        self.model, self.model_cfg, self.params, self.cfg = model, model_cfg, params, engine_cfg
        self.token_buckets = token_buckets(engine_cfg.max_num_tokens)
        num_slots = engine_cfg.num_blocks * engine_cfg.block_size
        self.kv_cache = [
            (jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype))
            for shape in model.kv_cache_shape(model_cfg, num_slots)
        ]
        self._forward = jax.jit(functools.partial(_forward_logits, model, model_cfg), donate_argnums=(1,))
        self._sample = jax.jit(_sample_step)
        self._base_key = jax.random.key(engine_cfg.seed)
        self._num_steps = 0

    def layout_for(self, num_tokens: int) -> BatchLayout:
        T = pick_bucket(self.token_buckets, num_tokens)
        return BatchLayout(T, seqs_for_tokens(T, self.cfg.max_num_seqs), self.cfg.max_blocks_per_seq,
                           self.cfg.block_size)

    def forward(self, scheduled: list[tuple[RequestState, int]]) -> jax.Array:
        """Run the model on the scheduled tokens; returns logits [B, V] (not yet computed)."""
        num_tokens = sum(n for _, n in scheduled)
        batch = build_step_batch(scheduled, self.layout_for(num_tokens))
        return self._run_forward(batch)

    def _run_forward(self, batch: StepBatch) -> jax.Array:
        self.kv_cache, logits = self._forward(self.params, self.kv_cache, batch)
        return logits

    def sample(self, logits: jax.Array, requests: list[RequestState]) -> np.ndarray:
        """One token per row of `requests`, sampled on device."""
        sampling = build_sampling_batch(requests, logits.shape[0])
        return self._run_sample(logits, sampling)[:len(requests)]

    def _run_sample(self, logits, sampling: SamplingBatch) -> np.ndarray:
        self._num_steps += 1
        step = np.uint32(self._num_steps)
        return np.asarray(self._sample(logits, sampling, self._base_key, step))

    def warm_up(self) -> float:
        """Compile (and run once) every bucket's programs, so serving never compiles."""
        start = time.perf_counter()
        for i, T in enumerate(self.token_buckets):
            t0 = time.perf_counter()
            layout = self.layout_for(T)
            batch = empty_step_batch(T, layout.num_seqs, layout.max_blocks, layout.block_size)
            logits = self._run_forward(batch)
            self._run_sample(logits, greedy_sampling_batch(layout.num_seqs))
            logger.info("xla-inference: compiled bucket %d/%d (tokens=%d, seqs=%d) in %.1fs",
                        i + 1, len(self.token_buckets), T, layout.num_seqs, time.perf_counter() - t0)
        return time.perf_counter() - start
