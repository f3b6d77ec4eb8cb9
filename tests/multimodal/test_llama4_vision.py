"""Llama 4 with images on our engine (no vLLM), against transformers'
Llama4ForConditionalGeneration on a tiny random checkpoint saved by transformers: the
tower, adapter and projector's output for every tile of an image cut into a 2x2 grid plus
its global tile, the prompt logits with that image (its placeholders cut across
chunked-prefill steps), greedy decoding after it."""

import numpy as np
import pytest

from tests.helpers import tiny_engine
from tests.multimodal.tiny_llama4_vision import (IMAGE, IMAGE_END, IMAGE_START, PATCH_TOKEN,
                                                 TOKENS_PER_TILE, image, save_tiny_llama4_vision)
from xla_inference.models.interface import MultimodalItem
from xla_inference.runner.requests import RequestState

pytestmark = pytest.mark.slow  # transformers builds the checkpoint and the reference

NUM_NEW = 6
PROMPT = f"t5 t6 t7 {IMAGE} t8 t9 t10 t11"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_llama4_vision(tmp_path_factory.mktemp("tiny_llama4_vision"))


@pytest.fixture(scope="module")
def processed(checkpoint):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    out = processor(text=[PROMPT], images=[image(50, 70, seed=0)], return_tensors="pt")
    out["pixel_values"] = out["pixel_values"].float()  # bfloat16 from the processor: exact
    return out


@pytest.fixture(scope="module")
def reference(checkpoint, processed):
    """transformers' image features (projected), logits at every prompt position, greedy
    continuation."""
    import torch
    from transformers import Llama4ForConditionalGeneration

    model = Llama4ForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        tiles = model.get_image_features(processed["pixel_values"]).last_hidden_state
        features = model.multi_modal_projector(tiles)
        logits = model(**processed).logits[0].numpy()
        out = model.generate(**processed, max_new_tokens=NUM_NEW, do_sample=False,
                             min_new_tokens=NUM_NEW)
    return features.numpy(), logits, out[0, processed["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def engine(checkpoint):
    """One engine for the module: each test's request rewrites the same pages."""
    return tiny_engine(checkpoint)


def _request(processed, identifier="img0"):
    ids = processed["input_ids"][0].tolist()
    offset, end = ids.index(IMAGE_START), ids.index(IMAGE_END)
    is_embed = np.array([t == PATCH_TOKEN for t in ids[offset:end + 1]])
    item = MultimodalItem(identifier, "image", offset, end + 1 - offset,
                          {"pixel_values": processed["pixel_values"].numpy()}, is_embed)
    req = RequestState("r0", ids, len(ids), [list(range(1, 13))], 0)  # 12 pages of 4 tokens
    req.mm_items = [item]
    return req


def test_tower_adapter_and_projector_equal_transformers(engine, processed, reference):
    from xla_inference.multimodal.llama4_vision import encoder_program

    features, _, _ = reference
    assert features.shape == (5, TOKENS_PER_TILE, 64)  # a 2x2 grid and the global tile
    program = encoder_program(engine.model_cfg.vision)
    got = np.stack([np.asarray(program(engine.params.vision, tile))
                    for tile in processed["pixel_values"].numpy()])
    np.testing.assert_allclose(got, features, atol=2e-4, rtol=0)
    assert np.abs(features).max() > 0.5  # features of unit scale: errors would show


def test_rotary_turns_pairs_by_column_then_row():
    """The 2-D rotary table against transformers' own (its complex freqs_ci): the angle of
    every adjacent pair, per patch, the class token's zero."""
    import torch
    from transformers import Llama4VisionConfig
    from transformers.models.llama4.modeling_llama4 import Llama4VisionRotaryEmbedding

    from xla_inference.multimodal.llama4_vision import Llama4VisionConfig as Ours
    from xla_inference.multimodal.llama4_vision import rotary_angles

    hf = Llama4VisionConfig(hidden_size=64, num_attention_heads=2, image_size=48, patch_size=8,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    expected = Llama4VisionRotaryEmbedding._compute_freqs_ci(hf)[:, 0]  # [37, 16] complex
    ours = Ours(hidden_size=64, intermediate_size=256, num_layers=1, num_heads=2, image_size=48,
                patch_size=8, pixel_shuffle_ratio=0.5, projector_input_dim=8,
                projector_output_dim=8, text_hidden_size=8)
    angles = rotary_angles(ours)
    np.testing.assert_allclose(np.cos(angles), expected.real.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.sin(angles), expected.imag.numpy(), atol=1e-6)
    assert torch.is_complex(expected) and np.abs(angles[:-1]).min() > 0


def test_prompt_logits_with_an_image_cut_across_steps(engine, processed, reference):
    _, logits, _ = reference
    req = _request(processed)
    item = req.mm_items[0]
    assert item.num_embeds == 5 * TOKENS_PER_TILE and req.num_prompt_tokens == 7 + item.length
    engine.encode(req, [0])
    # Attention is causal: the image's placeholders may be cut across steps (vLLM's chunked
    # prefill), here inside the second tile and inside the global tile.
    for num_new in (9, 15, req.num_prompt_tokens - 24):
        out = np.asarray(engine.forward([(req, num_new)]).logits)[0]
        req.num_computed_tokens += num_new
        np.testing.assert_allclose(out, logits[req.num_computed_tokens - 1], atol=2e-4, rtol=0)
    assert np.abs(logits[-1]).max() > 1  # logits of unit scale: errors would show


def test_greedy_decoding_after_an_image(engine, processed, reference):
    _, _, expected = reference
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


def test_tiles_and_placeholders_must_agree(engine, processed):
    from xla_inference.models.llama4_mm import encode

    pixels = processed["pixel_values"].numpy()
    item = MultimodalItem("img1", "image", 0, 4 * TOKENS_PER_TILE, {"pixel_values": pixels[:3]})
    with pytest.raises(ValueError, match="3 tiles gives 12 embeddings"):
        encode(engine.params, engine.model_cfg, item)
    raw = MultimodalItem("img2", "image", 0, TOKENS_PER_TILE,
                         {"pixel_values": np.zeros((1, 3, 32, 32), np.uint8)})
    with pytest.raises(ValueError, match="normalized float pixels"):
        encode(engine.params, engine.model_cfg, raw)
