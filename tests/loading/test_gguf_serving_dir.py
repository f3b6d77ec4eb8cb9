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


def test_serving_dir_linking_a_moved_gguf_is_rebuilt(tmp_path):
    """A cache kept across checkouts may hold a link to a GGUF that is gone (CI found one):
    the directory is rebuilt to link the file where it is now, not served dangling."""
    import shutil

    from xla_inference.loading.default_model import (GGUF_WEIGHTS_NAME, default_gguf_path,
                                                     prepare_gguf_serving_dir)

    first = tmp_path / "first" / "model-q4.gguf"
    first.parent.mkdir()
    shutil.copyfile(default_gguf_path(), first)
    model_dir = prepare_gguf_serving_dir(first, "m", cache_dir=tmp_path / "served")
    assert (model_dir / GGUF_WEIGHTS_NAME).resolve() == first.resolve()

    moved = tmp_path / "moved" / "model-q4.gguf"
    moved.parent.mkdir()
    first.rename(moved)
    assert not (model_dir / GGUF_WEIGHTS_NAME).is_file()  # dangling now
    again = prepare_gguf_serving_dir(moved, "m", cache_dir=tmp_path / "served")
    assert again == model_dir
    assert (again / GGUF_WEIGHTS_NAME).resolve() == moved.resolve()
    assert (again / "tokenizer.json").exists()
