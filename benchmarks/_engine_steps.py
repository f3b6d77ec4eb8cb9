"""What benchmarks/batch1_step.py and benchmarks/quantized_engine_steps.py share: the engine's
step on SmolLM2-135M as served on the host CPU with dtype=bfloat16, its checkpoint variants,
decode requests over a ~300-token context, and the variants' steps timed in turns."""

import time

import jax
import jax.numpy as jnp

from xla_inference.loading.default_model import default_gguf_path, prepare_default_model
from xla_inference.runner.build import Precision, load
from xla_inference.runner.requests import RequestState

BLOCK = 16
CONTEXT = 300

# bfloat16 projections, float32 elsewhere (the CPU with dtype=bfloat16).
BF16_PRECISION = Precision(jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32),
                           jnp.dtype(jnp.float32))


def load_variant(variant: str):
    """The model of a variant, loaded with BF16_PRECISION: the bfloat16 safetensors ("bf16"),
    the embedded GGUF kept quantized (Q4_1, "gguf") or online int8 ("int8")."""
    source, quantization = {"bf16": (prepare_default_model, None),
                            "gguf": (default_gguf_path, None),
                            "int8": (prepare_default_model, "int8")}[variant]
    return load(source(), BF16_PRECISION, quantization=quantization)


def decode_requests(num, rng, first_block):
    """`num` decode requests, each at CONTEXT tokens in its own pages from first_block on."""
    pages_each = (CONTEXT + BLOCK) // BLOCK + 1
    reqs = []
    for i in range(num):
        blocks = list(range(first_block + i * pages_each, first_block + (i + 1) * pages_each))
        tokens = rng.integers(0, 49152, size=CONTEXT + 1).tolist()
        reqs.append((RequestState(f"d{i}", tokens, CONTEXT, [blocks], num_computed_tokens=CONTEXT), 1))
    return reqs


def alternated_step_seconds(engines: dict, reqs, repeats: int) -> dict[str, list[float]]:
    """Each engine's step on `reqs`, timed `repeats` times with the engines taking turns."""
    times = {name: [] for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            t0 = time.perf_counter()
            jax.block_until_ready(engine.forward(reqs).logits)
            times[name].append(time.perf_counter() - t0)
    return times
