"""A GGUF served kept quantized (what `xla-inference serve` runs by default, and for any
`serve model.gguf`): a directory vLLM can read (config, tokenizer) with the file linked, no
float weights; loading it gives the file's weights quantized."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # builds the tokenizer from the GGUF with transformers


def test_default_gguf_dir_serves_the_file_quantized():
    from xla_inference.loading.checkpoint import load_checkpoint
    from xla_inference.loading.default_model import (GGUF_WEIGHTS_NAME, default_gguf_path,
                                                     prepare_default_gguf_model,
                                                     prepare_default_model)

    model_dir = prepare_default_gguf_model()
    assert (model_dir / GGUF_WEIGHTS_NAME).resolve() == default_gguf_path().resolve()
    assert not list(model_dir.glob("*.safetensors"))
    assert (model_dir / "tokenizer.json").exists()
    float_dir = prepare_default_model()
    assert (json.loads((model_dir / "config.json").read_text())
            == json.loads((float_dir / "config.json").read_text()))
    config, tensors = load_checkpoint(model_dir)
    name = "model.layers.0.mlp.down_proj.weight"
    quantized = tensors.quantized_weight(name)
    assert quantized is not None and quantized.kind == "int4"  # Q4_1
    _, float_tensors = load_checkpoint(float_dir)
    np.testing.assert_array_equal(quantized.dequantize(np.float32), float_tensors[name])
