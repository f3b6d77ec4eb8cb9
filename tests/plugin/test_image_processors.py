"""vLLM's multimodal front end imports here: transformers' torchvision-based image
processors (which vLLM's qwen2_vl / gemma3_mm modules import) run next to vLLM's CPU torch,
through xla_inference.torchvision_compat (installed by ./dev as a .pth file)."""

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def _image(height, width, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_torchvision_imports_with_transformers():
    import torch
    import torchvision
    import transformers  # noqa: F401

    assert torchvision.__version__.split("+")[0] == "0.28.0"
    assert torch.__version__.startswith("2.13.0")
    with pytest.raises(Exception):  # the CUDA build's detection ops stay unavailable
        torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)


def test_qwen2_vl_processor_matches_the_pil_backend():
    """The torchvision processor (vLLM's) against transformers' PIL/numpy one: an image
    that needs no resize (28-pixel multiples) is exact; one that is resized is close."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    images = [_image(56, 84, 0), _image(61, 97, 1)]
    ours = Qwen2VLImageProcessor()(images=images, return_tensors="np")
    reference = Qwen2VLImageProcessorPil()(images=images, return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], reference["image_grid_thw"])
    rows = int(np.prod(ours["image_grid_thw"][0]))
    np.testing.assert_allclose(ours["pixel_values"][:rows], reference["pixel_values"][:rows], atol=1e-5)
    # Bicubic resampling differs between torchvision and PIL by a few grey levels.
    difference = np.abs(ours["pixel_values"][rows:] - reference["pixel_values"][rows:])
    assert difference.mean() < 0.05


def test_vllm_qwen2_5_vl_and_gemma3_modules_import():
    from vllm.model_executor.models import gemma3_mm, qwen2_5_vl

    assert qwen2_5_vl.Qwen2_5_VLForConditionalGeneration.supports_multimodal
    assert gemma3_mm.Gemma3ForConditionalGeneration.supports_multimodal


def _tiny_qwen2_5_vl(path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
                       "out_hidden_size": 64, "fullatt_block_indexes": [0]})
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    return path


def test_qwen2_5_vl_images_are_served_and_other_paths_refused(tmp_path):
    """A Qwen2.5-VL checkpoint starts with image inputs on the native family (vLLM's
    on-device normalization kept on: our encoder normalizes the raw pixels itself); the
    torch path, which ignores encoder inputs, is refused by name; --language-model-only
    serves the text model."""
    from vllm.engine.arg_utils import EngineArgs

    model = _tiny_qwen2_5_vl(tmp_path / "qwen2_5_vl")

    def config(**args):
        return EngineArgs(model=str(model), max_model_len=128, skip_tokenizer_init=True,
                          **args).create_engine_config()

    served = config().model_config
    assert served.supports_multimodal_inputs
    assert served.multimodal_config.mm_device_do_normalize is True
    with pytest.raises(Exception, match="does not support image, video or audio inputs"):
        config(model_impl="vllm")
    assert not config(language_model_only=True).model_config.supports_multimodal_inputs


def test_gemma3_keeps_on_device_normalization_for_our_tower(tmp_path):
    """vLLM's Gemma 3 class cannot normalize raw pixels, so vLLM alone resolves
    mm_device_do_normalize off for it; our tower can (models/gemma3_mm.encode), so the
    platform keeps vLLM's default on, with the processor's scale and shift (SigLIP's mean
    and std 0.5: x * 2/255 - 1) for the encoder. An explicit False still turns it off."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs

    from tests.multimodal.tiny_gemma3_vision import save_tiny_gemma3_vision
    from xla_inference.plugin.model_runner import mm_pixel_affine

    model = save_tiny_gemma3_vision(tmp_path / "gemma3")

    def config(**args):
        return EngineArgs(model=str(model), max_model_len=128, **args).create_engine_config()

    served = config()
    assert served.model_config.multimodal_config.mm_device_do_normalize is True
    with set_current_vllm_config(served):  # as in the worker: vLLM's norm is a CustomOp
        affine = mm_pixel_affine(served.model_config)
    np.testing.assert_allclose(affine, [[2 / 255] * 3, [-1.0] * 3], rtol=1e-6)
    off = config(mm_device_do_normalize=False).model_config
    assert off.multimodal_config.mm_device_do_normalize is False
    assert mm_pixel_affine(off) is None
