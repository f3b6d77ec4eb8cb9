"""Gemma 3 with images on our engine (no vLLM), against transformers'
Gemma3ForConditionalGeneration on a tiny random checkpoint saved by transformers: the
SigLIP tower and projector's output, the prompt logits with an image (bidirectional
attention inside the image, on a sliding and a global layer), greedy decoding after it."""

import numpy as np
import pytest

from tests.helpers import tiny_engine
from tests.multimodal.tiny_gemma3_vision import (BOI, EOI, IMAGE, IMAGE_TOKEN, MM_TOKENS,
                                                 image, save_tiny_gemma3_vision)
from xla_inference.models.interface import MultimodalItem
from xla_inference.runner.requests import RequestState

pytestmark = pytest.mark.slow  # transformers builds the checkpoint and the reference

NUM_NEW = 6
PROMPT = f"t5 t6 t7 {IMAGE} t8 t9 t10 t11"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_gemma3_vision(tmp_path_factory.mktemp("tiny_gemma3_vision"))


@pytest.fixture(scope="module")
def processed(checkpoint):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    return processor(text=[PROMPT], images=[image(50, 70, seed=0)], return_tensors="pt")


@pytest.fixture(scope="module")
def reference(checkpoint, processed):
    """transformers' image features, logits at every prompt position, greedy continuation."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        features = model.get_image_features(processed["pixel_values"]).pooler_output
        logits = model(**processed).logits[0].numpy()
        out = model.generate(**processed, max_new_tokens=NUM_NEW, do_sample=False,
                             min_new_tokens=NUM_NEW)
    return features[0].numpy(), logits, out[0, processed["input_ids"].shape[1]:].tolist()


def _request(processed, identifier="img0"):
    ids = processed["input_ids"][0].tolist()
    offset, end = ids.index(BOI), ids.index(EOI)
    is_embed = np.array([t == IMAGE_TOKEN for t in ids[offset:end + 1]])
    item = MultimodalItem(identifier, "image", offset, end + 1 - offset,
                          {"pixel_values": processed["pixel_values"].numpy()}, is_embed)
    req = RequestState("r0", ids, len(ids), [list(range(1, 13))], 0)  # 12 pages of 4 tokens
    req.mm_items = [item]
    return req


def test_vision_tower_and_projector_equal_transformers(checkpoint, processed, reference):
    from xla_inference.multimodal.gemma3_vision import encoder_program, pixel_affine

    features, _, _ = reference
    engine = tiny_engine(checkpoint)
    cfg = engine.model_cfg.vision
    got = np.asarray(encoder_program(cfg)(engine.params.vision,
                                          processed["pixel_values"][0].numpy(), pixel_affine(cfg)))
    assert got.shape == (MM_TOKENS, 64)
    np.testing.assert_allclose(got, features, atol=2e-4, rtol=0)
    assert np.abs(features).max() > 0.5  # features of unit scale: errors would show


def test_raw_uint8_pixels_normalized_in_the_tower(checkpoint, reference):
    """vLLM's mm_device_do_normalize: the processor skips its rescale and normalize and hands
    over uint8 pixels with its per-channel scale and shift (rescale / std, -mean / std); the
    encoder applies them in its program, giving transformers' features of the normalized
    pixels. uint8 pixels without them are refused, not read as normalized."""
    from transformers import AutoProcessor

    from xla_inference.models.gemma3_mm import encode
    from xla_inference.models.interface import PIXEL_AFFINE

    processor = AutoProcessor.from_pretrained(checkpoint)
    raw = processor(text=[PROMPT], images=[image(50, 70, seed=0)], return_tensors="np",
                    do_rescale=False, do_normalize=False)["pixel_values"]
    assert raw.dtype == np.uint8
    ip = processor.image_processor
    std, mean = np.asarray(ip.image_std), np.asarray(ip.image_mean)
    affine = np.stack([ip.rescale_factor / std, -mean / std]).astype(np.float32)
    engine = tiny_engine(checkpoint)
    item = MultimodalItem("img0", "image", 0, MM_TOKENS, {"pixel_values": raw, PIXEL_AFFINE: affine})
    got = np.asarray(encode(engine.params, engine.model_cfg, item))
    np.testing.assert_allclose(got, reference[0], atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="uint8 pixels alone"):
        encode(engine.params, engine.model_cfg,
               MultimodalItem("img1", "image", 0, MM_TOKENS, {"pixel_values": raw}))


@pytest.mark.parametrize("tensor_parallel", [1, 2], ids=["one_device", "tp2"])
def test_prompt_logits_with_an_image(checkpoint, processed, reference, tensor_parallel):
    from xla_inference.parallel.sharding import build_mesh

    _, logits, _ = reference
    engine = tiny_engine(checkpoint, mesh=build_mesh(tensor_parallel))
    req = _request(processed)
    assert req.mm_items[0].num_embeds == MM_TOKENS and req.num_prompt_tokens == 7 + 18
    engine.encode(req, [0])
    # The text before the image, then the image whole (vLLM never cuts it), then the rest.
    image_end = req.mm_items[0].offset + req.mm_items[0].length
    for num_new in (2, image_end - 2, req.num_prompt_tokens - image_end):
        out = np.asarray(engine.forward([(req, num_new)]).logits)[0]
        req.num_computed_tokens += num_new
        np.testing.assert_allclose(out, logits[req.num_computed_tokens - 1], atol=2e-4, rtol=0)
    assert np.abs(logits[-1]).max() > 1  # logits of unit scale: errors would show


def test_bidirectional_attention_matters(checkpoint, processed, reference):
    """The widened mask is what makes the logits above match: with every token causal
    (the soft tokens' mask positions their own) the prompt's last logits differ."""
    import jax
    import jax.numpy as jnp

    from xla_inference.models import gemma3_mm

    _, logits, _ = reference
    engine = tiny_engine(checkpoint)
    req = _request(processed, identifier="causal")
    engine.encode(req, [0])
    original = gemma3_mm._mask_positions
    gemma3_mm._mask_positions = lambda batch: jnp.asarray(batch.attention.positions)
    try:
        jax.clear_caches()
        out = np.asarray(engine.forward([(req, req.num_prompt_tokens)]).logits)[0]
    finally:
        gemma3_mm._mask_positions = original
        jax.clear_caches()
    assert np.abs(out - logits[-1]).max() > 1e-2


def test_greedy_decoding_after_an_image(checkpoint, processed, reference):
    _, _, expected = reference
    engine = tiny_engine(checkpoint)
    req = _request(processed)
    engine.encode(req, [0])
    tokens = []
    for step in range(NUM_NEW):
        num_new = req.num_prompt_tokens if step == 0 else 1
        logits = np.asarray(engine.forward([(req, num_new)]).logits)[0]
        req.num_computed_tokens += num_new
        tokens.append(int(logits.argmax()))
        req.token_ids.append(tokens[-1])
    assert tokens == expected


def test_an_image_past_the_sliding_window_is_refused(checkpoint, processed):
    engine = tiny_engine(checkpoint)
    req = _request(processed)
    req.mm_items[0].offset += 40  # its soft tokens would end past position 48
    with pytest.raises(ValueError, match="sliding window"):
        engine.forward([(req, 4)])


def test_pan_and_scan_crops(tmp_path):
    """A wide image with pan-and-scan: the image and its crops are images of their own in
    one item (text between them), each crop's soft tokens attending within their crop."""
    import torch
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    checkpoint = save_tiny_gemma3_vision(tmp_path / "wide_window", sliding_window=256)
    processed = AutoProcessor.from_pretrained(checkpoint)(
        text=[PROMPT], images=[image(64, 160, seed=3)], return_tensors="pt",
        do_pan_and_scan=True, pan_and_scan_min_crop_size=32)
    assert processed["pixel_values"].shape[0] == 4  # the image and 3 crops
    with torch.no_grad():
        model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint).eval()
        expected = model(**processed).logits[0, -1].numpy()
    req = _request(processed)
    req.block_ids = [list(range(1, 33))]  # 32 pages of 4 tokens
    ids = req.token_ids
    last_eoi = len(ids) - 1 - ids[::-1].index(EOI)
    item = req.mm_items[0]
    item.length = last_eoi + 1 - item.offset
    item.is_embed = np.array([t == IMAGE_TOKEN for t in ids[item.offset:last_eoi + 1]])
    assert item.num_embeds == 4 * MM_TOKENS
    engine = tiny_engine(checkpoint, max_num_tokens=128)
    engine.encode(req, [0])
    out = np.asarray(engine.forward([(req, req.num_prompt_tokens)]).logits)[0]
    np.testing.assert_allclose(out, expected, atol=2e-4, rtol=0)
