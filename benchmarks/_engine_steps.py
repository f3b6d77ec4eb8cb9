"""What benchmarks/batch1_step.py and benchmarks/quantized_engine_steps.py share: the engine's
step on SmolLM2-135M as served on the host CPU with dtype=bfloat16, its checkpoint variants,
decode requests over a ~300-token context, and the variants' steps timed in turns."""

import dataclasses
import time

import jax
import jax.numpy as jnp
from _server import prepare_awq_model

from xla_inference.loading.default_model import default_gguf_path, prepare_default_model
from xla_inference.runner.build import Precision, load
from xla_inference.runner.requests import RequestState

BLOCK = 16
CONTEXT = 300

# bfloat16 projections, float32 elsewhere (the CPU with dtype=bfloat16).
BF16_PRECISION = Precision(jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32),
                           jnp.dtype(jnp.float32))
# The same with the bfloat16 KV cache that the native attention kernel reads (what
# Precision.for_platform gives dtype=bfloat16 on the CPU with that kernel).
BF16_KV_PRECISION = dataclasses.replace(BF16_PRECISION, kv_cache=jnp.dtype(jnp.bfloat16))


def load_variant(variant: str, kv_cache: str | None = None):
    """The model of a variant, loaded with BF16_PRECISION: the bfloat16 safetensors ("bf16"),
    the embedded GGUF kept quantized (Q4_1, "gguf"), online int8 ("int8") or the AWQ 4-bit
    checkpoint (group size 64, round-to-nearest; _server.prepare_awq_model, "awq"); "bf16kv" and
    "fp8kv": the bfloat16 safetensors with a bfloat16 (BF16_KV_PRECISION) or fp8 e4m3 KV
    cache. kv_cache "bfloat16" gives every variant the bfloat16 KV cache (what serving
    with dtype=bfloat16 gives the CPU with the native attention kernel)."""
    source, quantization = {"bf16": (prepare_default_model, None),
                            "bf16kv": (prepare_default_model, None),
                            "fp8kv": (prepare_default_model, None),
                            "gguf": (default_gguf_path, None),
                            "int8": (prepare_default_model, "int8"),
                            "awq": (lambda: prepare_awq_model(prepare_default_model()),
                                    None)}[variant]
    precision = {"bf16kv": BF16_KV_PRECISION,
                 "fp8kv": BF16_PRECISION.with_kv_cache("fp8")}.get(variant, BF16_PRECISION)
    if kv_cache == "bfloat16" and variant != "fp8kv":
        precision = BF16_KV_PRECISION
    return load(source(), precision, quantization=quantization)


def decode_requests(num, rng, first_block, context=CONTEXT):
    """`num` decode requests, each at `context` tokens in its own pages from first_block on."""
    pages_each = (context + BLOCK) // BLOCK + 1
    reqs = []
    for i in range(num):
        blocks = list(range(first_block + i * pages_each, first_block + (i + 1) * pages_each))
        tokens = rng.integers(0, 49152, size=context + 1).tolist()
        reqs.append((RequestState(f"d{i}", tokens, context, [blocks], num_computed_tokens=context), 1))
    return reqs


def alternated_step_seconds(engines: dict, reqs, repeats: int,
                            cpu_seconds: dict | None = None,
                            dispatch_seconds: dict | None = None) -> dict[str, list[float]]:
    """Each engine's step on `reqs`, timed `repeats` times with the engines taking turns;
    each step's process CPU time too, into `cpu_seconds` (name -> list) when given (on a busy
    machine it varies less than the wall time); and into `dispatch_seconds` the time until
    engine.forward returns (the host's part: the step's batch and the jit call with every
    parameter array; a server overlaps it with the previous step, on the same cores)."""
    times = {name: [] for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            c0, t0 = time.process_time(), time.perf_counter()
            out = engine.forward(reqs)
            if dispatch_seconds is not None:
                dispatch_seconds.setdefault(name, []).append(time.perf_counter() - t0)
            jax.block_until_ready(out.logits)
            times[name].append(time.perf_counter() - t0)
            if cpu_seconds is not None:
                cpu_seconds.setdefault(name, []).append(time.process_time() - c0)
    return times


def pipelined_step_seconds(engines: dict, reqs, repeats: int, steps: int) -> dict[str, list[float]]:
    """Each engine's seconds a step over runs of `steps` steps on `reqs`, each step
    dispatched while the one before it runs (as a server's async scheduling does: the host's
    part of a step, on the same cores, overlaps the device's), the engines taking turns for
    `repeats` runs each."""
    times = {name: [] for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            t0 = time.perf_counter()
            pending = engine.forward(reqs)
            for _ in range(steps - 1):
                following = engine.forward(reqs)
                jax.block_until_ready(pending.logits)
                pending = following
            jax.block_until_ready(pending.logits)
            times[name].append((time.perf_counter() - t0) / steps)
    return times
