"""Qwen2.5-VL's vision tower in JAX against transformers' on a tiny random checkpoint saved by
transformers: windowed and full-attention blocks, windows cut at the image edge, a video of
two frames, and several images in one call."""

import numpy as np
import pytest

from tests.multimodal.tiny_qwen2_5_vl import save_tiny_qwen2_5_vl
from xla_inference.loading.checkpoint import load_checkpoint
from xla_inference.multimodal.attention import QUERY_CHUNK
from xla_inference.multimodal.qwen2_5_vl_vision import (VisionConfig, encode_images, encoder_for_grid,
                                                        pixel_affine, vision_params)

pytestmark = pytest.mark.slow  # transformers builds and saves the checkpoint (~20 s)

# (t, h, w) in patches: windows of 4x4 merge groups cut at the right and bottom edges; an
# exact 2x2 windows; two frames (full attention stays inside a frame); a frame of 320
# patches, whose full-attention queries go in 3 chunks (QUERY_CHUNK), the last one padded.
GRIDS = [(1, 12, 20), (1, 16, 16), (2, 4, 6), (1, 16, 20)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration

    # Three blocks: windowed, full attention, windowed again.
    path = save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), vision_depth=3)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    return path, model.model.visual


def _pixels(grids, seed):
    rows = sum(int(np.prod(g)) for g in grids)
    return np.random.default_rng(seed).standard_normal((rows, 3 * 2 * 14 * 14)).astype(np.float32)


def _reference(visual, pixels, grids):
    import torch
    with torch.no_grad():
        out = visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grids))
    return out.pooler_output.numpy()


def _ours(path, pixels, grids):
    hf_config, tensors = load_checkpoint(path)
    config = VisionConfig.from_hf(hf_config["vision_config"])
    params = vision_params(tensors, config)
    return np.concatenate([np.asarray(e) for e in encode_images(config, params, pixels, grids)])


@pytest.mark.parametrize("grids", [[GRIDS[0]], [GRIDS[1], GRIDS[0]], [GRIDS[2]], [GRIDS[3]]],
                         ids=["one_image", "two_images", "video", "chunked_queries"])
def test_matches_transformers(checkpoint, grids):
    path, visual = checkpoint
    pixels = _pixels(grids, seed=len(grids))
    reference = _reference(visual, pixels, grids)
    ours = _ours(path, pixels, grids)
    assert ours.shape == reference.shape == (sum(int(np.prod(g)) for g in grids) // 4, 64)
    np.testing.assert_allclose(ours, reference, atol=2e-4, rtol=0)


def test_large_frame_is_chunked():
    """The chunked_queries case keeps its meaning if QUERY_CHUNK changes: 3 unequal chunks."""
    t, h, w = GRIDS[3]
    assert 2 * QUERY_CHUNK < h * w < 3 * QUERY_CHUNK and (h * w) % 3


def test_raw_pixels_normalized_in_the_program(checkpoint):
    """uint8 pixels with the processor's scale and shift (vLLM's mm_device_do_normalize)
    give what the pixels normalized in float64 give."""
    path, _ = checkpoint
    hf_config, tensors = load_checkpoint(path)
    config = VisionConfig.from_hf(hf_config["vision_config"])
    params = vision_params(tensors, config)
    mean, std = np.array([0.48, 0.46, 0.41]), np.array([0.27, 0.26, 0.28])
    raw = np.random.default_rng(7).integers(0, 256, (int(np.prod(GRIDS[0])), config.patch_features),
                                            dtype=np.uint8)
    by_channel = raw.reshape(len(raw), 3, -1)  # a patch's features are channel-major
    normalized = ((by_channel / 255.0 - mean[:, None]) / std[:, None]).reshape(len(raw), -1)
    program = encoder_for_grid(config, GRIDS[0])
    ours = program(params, raw, pixel_affine(config, 1 / 255 / std, -mean / std))
    reference = program(params, normalized.astype(np.float32), pixel_affine(config))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=1e-5, rtol=0)


def test_one_program_per_grid(checkpoint):
    path, _ = checkpoint
    grids = [GRIDS[1], GRIDS[1]]
    _ours(path, _pixels(grids, seed=5), grids)
    hf_config, _ = load_checkpoint(path)
    encoder = encoder_for_grid(VisionConfig.from_hf(hf_config["vision_config"]), GRIDS[1])
    assert encoder._cache_size() == 1  # the second image of the same size compiled nothing
