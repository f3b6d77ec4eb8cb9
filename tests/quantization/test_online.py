"""Online quantization end to end through the engine (runner/build.py, the worker's
build): --quantization int8 / fp8 on an unquantized checkpoint gives the logits of
transformers running the same checkpoint with every projection replaced by its
dequantized per-channel values, over a ragged batch (prefill, a chunk, decode), for a dense
family, a tied one and a MoE one; the weights stay quantized in memory."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import (ENGINE_BLOCK, assert_ragged_logits, hf_logits, rewrite_checkpoint,
                           save_tiny_family, save_tiny_llama)
from xla_inference.quantization.groups import FP8, INT8
from xla_inference.quantization.online import ONLINE_METHODS, quantize_per_channel
from xla_inference.quantization.packed import PackedWeight

# Decode rows run the native kernel, which quantizes activations to 15 bits (product.py):
# about 1e-4 of a logit's scale; the rest is float32 on both sides.
TOL = 2e-3
# Mixtral's experts name their gate, down and up projections w1, w2, w3.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "lm_head", "w1", "w2", "w3")


def save_dequantized(src: Path, dst: Path, kind: str) -> Path:
    """A copy of `src` whose projection matrices, MoE experts' included, hold their
    per-channel quantized values (dequantized, float32), the LM head untied: transformers
    on it is the reference."""
    import torch

    def dequantized(name, t):
        if t.ndim == 2 and any(name.endswith(f"{p}.weight") for p in PROJECTIONS):
            return torch.from_numpy(quantize_per_channel(t.numpy(), kind).dequantize(np.float32))
        return t

    return rewrite_checkpoint(src, dst, dequantized)


def online_engine(model_dir: Path, method: str):
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    model = load(model_dir, Precision.uniform(jnp.float32), quantization=method)
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=64,
                        max_num_seqs=8, max_model_len=128)
    return model, build_engine(model, ecfg, keep_host_params=True)


MODELS = {
    "llama": lambda path: save_tiny_llama(path),
    "llama-tied": lambda path: save_tiny_llama(path, tie=True),
    "qwen3-moe": lambda path: save_tiny_family(path, "qwen3_moe"),
}


@pytest.mark.parametrize("method", sorted(ONLINE_METHODS))
@pytest.mark.parametrize("model", MODELS)
def test_online_logits_match_transformers_on_dequantized_weights(tmp_path, model, method):
    src = MODELS[model](tmp_path / "m")
    ref = save_dequantized(src, tmp_path / "ref", ONLINE_METHODS[method])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, size=n).tolist() for n in (11, 23, 14)]
    expected = [hf_logits(ref, p) for p in prompts]
    loaded, engine = online_engine(src, method)
    assert isinstance(loaded.params.layers[0].attn.wq, PackedWeight)
    assert loaded.params.layers[0].attn.wq.kind == ONLINE_METHODS[method]
    assert_ragged_logits(engine, prompts, expected, [{0: 11, 1: 9, 2: 13}, {1: 14, 2: 1}], TOL)


def test_quantized_weights_take_a_quarter_of_float32(tmp_path):
    """Weight bytes as the engine holds them (the worker's KV sizing sees them): the
    projections at one byte a weight plus the scales."""
    from xla_inference.runner.build import Precision, load

    src = save_tiny_llama(tmp_path / "m")
    dense = load(src, Precision.uniform(jnp.float32))
    int8 = load(src, Precision.uniform(jnp.float32), quantization="int8")
    projections = lambda p: [p.attn.wq, p.attn.wk, p.attn.wv, p.attn.wo,  # noqa: E731
                             p.mlp.w_gate, p.mlp.w_up, p.mlp.w_down]
    dense_bytes = sum(w.nbytes for layer in dense.params.layers for w in projections(layer))
    int8_bytes = sum(w.nbytes for layer in int8.params.layers for w in projections(layer))
    assert int8_bytes < 0.3 * dense_bytes
    assert int8.weight_bytes < dense.weight_bytes


def test_fp8_values_are_float8(tmp_path):
    from xla_inference.runner.build import Precision, load

    model = load(save_tiny_llama(tmp_path / "m"), Precision.uniform(jnp.float32),
                 quantization="fp8")
    w = model.params.layers[0].mlp.w_up
    assert w.kind == FP8 and w.values.dtype == jnp.float8_e4m3fn


def test_unknown_online_method_is_refused(tmp_path):
    from xla_inference.runner.build import Precision, load

    with pytest.raises(ValueError, match="needs a checkpoint quantized with it"):
        load(save_tiny_llama(tmp_path / "m"), Precision.uniform(jnp.float32), quantization="awq")
    assert INT8 in ONLINE_METHODS.values()
