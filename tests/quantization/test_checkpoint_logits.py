"""Every quantized checkpoint format end to end through the engine (the worker's build):
logits over a ragged batch (a prefill, a chunked prefill, decode steps) equal
transformers running the same model with each quantized weight replaced by its
dequantization from the integers the writer packed (tests/quantization/checkpoints.py),
and, for compressed-tensors' W8A8 int8, each quantized module's input quantized per token
to int8 the way the scheme prescribes."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import ENGINE_BLOCK, assert_ragged_logits, hf_logits
from tests.quantization.checkpoints import CHECKPOINTS, int8_token_inputs, linear_prefixes
from xla_inference.quantization.packed import PackedWeight

# Decode rows run the native kernel on 15-bit activations (quantization/product.py); the
# dense path and transformers are float32. W8A8: an activation within float32 rounding of
# a .5 boundary may round the other way on one side (one int8 step of one input).
TOL = 2e-3
W8A8_TOL = 5e-3
INT8_ACTIVATION_SCHEMES = {"ct-w8a8", "ct-w8a8-tensor"}
PLAN = [{0: 11, 1: 9, 2: 13}, {1: 14, 2: 1}]  # prefill, chunked prefill, decode


def _expected(name, reference_dir, prompts):
    from tests.helpers import hf_model

    if name not in INT8_ACTIVATION_SCHEMES:
        return [hf_logits(reference_dir, p) for p in prompts]
    hooks = int8_token_inputs(hf_model(reference_dir), linear_prefixes())
    try:
        return [hf_logits(reference_dir, p) for p in prompts]
    finally:
        for hook in hooks:
            hook.remove()


def _engine(model_dir, quantization=None):
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    model = load(model_dir, Precision.uniform(jnp.float32), quantization=quantization)
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=64,
                        max_num_seqs=8, max_model_len=128)
    return model, build_engine(model, ecfg, keep_host_params=True)


SERVED = [name for name in CHECKPOINTS if name != "gptq-4bit-desc-act"]


@pytest.mark.parametrize("name", SERVED)
def test_quantized_checkpoint_logits(name, quantized_checkpoint, dequantized_checkpoint):
    checkpoint = quantized_checkpoint(name)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, size=n).tolist() for n in (11, 23, 14)]
    expected = _expected(name, dequantized_checkpoint(name), prompts)
    model, engine = _engine(checkpoint.path)
    assert isinstance(model.params.layers[0].attn.wq, PackedWeight)
    tol = W8A8_TOL if name in INT8_ACTIVATION_SCHEMES else TOL
    assert_ragged_logits(engine, prompts, expected, PLAN, tol)
