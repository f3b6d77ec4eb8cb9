"""Qwen2.5-VL's encode (models/qwen2_5_vl.py) with vLLM's on-device normalization
(mm_device_do_normalize: the item carries PIXEL_AFFINE): raw pixels, as uint8 or as float
0-255 values, give the embeddings of the pixels normalized in float64 numpy and handed over
without it. The item's PIXEL_AFFINE decides, not the pixels' dtype: float pixels with it are
raw too. A tiny random tower (no transformers, no vLLM)."""

from types import SimpleNamespace

import numpy as np
import pytest

from xla_inference.models.interface import PIXEL_AFFINE, MultimodalItem
from xla_inference.models.qwen2_5_vl import encode
from xla_inference.multimodal.qwen2_5_vl_vision import VisionConfig, vision_params

# Two blocks (a windowed one, a full-attention one), 2x2 merge: 64 patches, 16 embeddings.
CONFIG = VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                      out_hidden_size=16, fullatt_block_indexes=(1,))
GRID = (1, 8, 8)
MEAN, STD, RESCALE = np.array([0.48, 0.46, 0.41]), np.array([0.27, 0.26, 0.28]), 1 / 255


def _tensors(config: VisionConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """transformers' tensor names and shapes ([out, in] weights), unit-scale random values."""
    rng = np.random.default_rng(seed)
    hidden, inner, merged = config.hidden_size, config.intermediate_size, 4 * config.hidden_size
    shapes = {"patch_embed.proj.weight": (hidden, config.patch_features),
              "merger.ln_q.weight": (hidden,),
              "merger.mlp.0.weight": (merged, merged), "merger.mlp.0.bias": (merged,),
              "merger.mlp.2.weight": (config.out_hidden_size, merged),
              "merger.mlp.2.bias": (config.out_hidden_size,)}
    for i in range(config.depth):
        for name, (out, inp) in {"attn.qkv": (3 * hidden, hidden), "attn.proj": (hidden, hidden),
                                 "mlp.gate_proj": (inner, hidden), "mlp.up_proj": (inner, hidden),
                                 "mlp.down_proj": (hidden, inner)}.items():
            shapes[f"blocks.{i}.{name}.weight"] = (out, inp)
            shapes[f"blocks.{i}.{name}.bias"] = (out,)
        shapes[f"blocks.{i}.norm1.weight"] = shapes[f"blocks.{i}.norm2.weight"] = (hidden,)
    tensors = {}
    for name, shape in shapes.items():
        if "norm" in name or "ln_q" in name:
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) > 1:
            value = rng.standard_normal(shape) * shape[1] ** -0.5
        else:
            value = rng.standard_normal(shape) * 0.1
        tensors["visual." + name] = value.astype(np.float32)
    return tensors


@pytest.fixture(scope="module")
def tower():
    params = SimpleNamespace(vision=vision_params(_tensors(CONFIG), CONFIG))
    return params, SimpleNamespace(vision=CONFIG)


def _item(pixels, affine=None) -> MultimodalItem:
    data = {"pixel_values": pixels, "image_grid_thw": np.array([GRID])}
    if affine is not None:
        data[PIXEL_AFFINE] = affine
    return MultimodalItem("img", "image", 0, int(np.prod(GRID)) // 4, data)


def _raw(dtype=np.uint8) -> np.ndarray:
    """Raw pixels: uint8, or float values anywhere in [0, 255]."""
    rng, shape = np.random.default_rng(1), (int(np.prod(GRID)), CONFIG.patch_features)
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.uniform(0, 255, shape).astype(dtype)


def _normalized_in_float64(raw: np.ndarray) -> np.ndarray:
    by_channel = raw.astype(np.float64).reshape(len(raw), 3, -1)  # features are channel-major
    return ((by_channel * RESCALE - MEAN[:, None]) / STD[:, None]).reshape(len(raw), -1)


def _affine() -> np.ndarray:
    """What plugin/model_runner.mm_pixel_affine hands over: rescale / std, -mean / std."""
    return np.stack([RESCALE / STD, -MEAN / STD]).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64], ids=lambda d: d.__name__)
def test_raw_pixels_with_the_affine_equal_normalized_pixels(tower, dtype):
    params, cfg = tower
    raw = _raw(dtype)
    reference = np.asarray(encode(params, cfg, _item(_normalized_in_float64(raw).astype(np.float32))))
    ours = np.asarray(encode(params, cfg, _item(raw, _affine())))
    assert ours.shape == reference.shape == (16, CONFIG.out_hidden_size)
    # The comparison has teeth: raw values read as normalized give other embeddings.
    assert np.abs(reference).max() > 0.1
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    misread = np.asarray(encode(params, cfg, _item(raw.astype(np.float32))))
    assert np.abs(misread - reference).max() > 1e-2


def test_uint8_pixels_without_the_affine_are_refused(tower):
    params, cfg = tower
    with pytest.raises(ValueError, match="got uint8 pixels alone"):
        encode(params, cfg, _item(_raw()))
