"""Qwen2.5-VL's language model with an image, on our engine (no vLLM): the logits of a
prompt whose image placeholders are cut across chunked-prefill steps, and greedy decoding
after it (M-RoPE's delta positions), against transformers' Qwen2_5_VLForConditionalGeneration
on a tiny random checkpoint saved by transformers."""

import numpy as np
import pytest

from tests.helpers import tiny_engine
from tests.multimodal.tiny_qwen2_5_vl import (IMAGE, IMAGE_PAD, VIDEO, VIDEO_PAD, image,
                                              save_tiny_qwen2_5_vl, video_frames)
from xla_inference.models.interface import MultimodalItem
from xla_inference.runner.requests import RequestState

pytestmark = pytest.mark.slow  # transformers builds the checkpoint and the reference

NUM_NEW = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"))


@pytest.fixture(scope="module")
def processed(checkpoint):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    return processor(text=[f"t5 t6 {IMAGE} t7 t8 t9"], images=[image(112, 168, seed=0)],
                     return_tensors="pt")


@pytest.fixture(scope="module")
def reference(checkpoint, processed):
    """transformers' logits at every prompt position, and its greedy continuation."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        logits = model(**processed).logits[0].numpy()
        out = model.generate(**processed, max_new_tokens=NUM_NEW, do_sample=False,
                             min_new_tokens=NUM_NEW)
    return logits, out[0, processed["input_ids"].shape[1]:].tolist()


def _request(processed, identifier="img0"):
    ids = processed["input_ids"][0].tolist()
    offset = ids.index(IMAGE_PAD)
    length = ids.count(IMAGE_PAD)
    item = MultimodalItem(identifier, "image", offset, length,
                          {"pixel_values": processed["pixel_values"].numpy(),
                           "image_grid_thw": processed["image_grid_thw"][0].numpy()})
    req = RequestState("r0", ids, len(ids), [list(range(1, 13))], 0)  # 12 pages of 4 tokens
    req.mm_items = [item]
    return req


@pytest.mark.parametrize("tensor_parallel", [1, 2], ids=["one_device", "tp2"])
def test_prompt_logits_with_an_image_cut_by_chunks(checkpoint, processed, reference,
                                                   tensor_parallel):
    from xla_inference.parallel.sharding import build_mesh

    logits, _ = reference
    engine = tiny_engine(checkpoint, mesh=build_mesh(tensor_parallel))
    req = _request(processed)
    image_start = req.mm_items[0].offset
    assert req.mm_items[0].length == 24 and req.num_prompt_tokens == 31
    engine.encode(req, [0])
    # Steps end inside the text, inside the image (twice), and at the prompt's end.
    for num_new in (image_start - 1, 9, 10, 31 - image_start - 18):
        out = np.asarray(engine.forward([(req, num_new)]).logits)[0]
        req.num_computed_tokens += num_new
        np.testing.assert_allclose(out, logits[req.num_computed_tokens - 1], atol=2e-4, rtol=0)
    assert req.num_computed_tokens == req.num_prompt_tokens
    assert np.abs(logits[-1]).max() > 1  # logits of unit scale: errors would show


def test_greedy_decoding_after_an_image(checkpoint, processed, reference):
    _, expected = reference
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
    assert req.mrope_delta < 0  # the image's 24 tokens take 4 x 6 positions: M-RoPE's delta
    assert tokens == expected


def test_image_embeddings_change_the_logits(checkpoint, processed, reference):
    """The placeholders' rows come from the encoder: another image gives other logits."""
    logits, _ = reference
    engine = tiny_engine(checkpoint)
    req = _request(processed, identifier="other")
    req.mm_items[0].data["pixel_values"] = req.mm_items[0].data["pixel_values"][::-1].copy()
    engine.encode(req, [0])
    out = np.asarray(engine.forward([(req, req.num_prompt_tokens)]).logits)[0]
    assert np.abs(out - logits[-1]).max() > 1e-2


# --- A video: four frames (two temporal patches) at 4 fps ------------------------------------


@pytest.fixture(scope="module")
def video_processed(checkpoint):
    """Frame pairs 0.5 s apart: time positions 0 and 2 (tokens_per_second 4)."""
    from transformers import AutoProcessor

    frames = video_frames(4, 56, 84, seed=3)
    return AutoProcessor.from_pretrained(checkpoint)(
        text=[f"t5 t6 {VIDEO} t7 t8 t9"], videos=[frames], return_tensors="pt",
        do_sample_frames=False, video_metadata=[{"fps": 4.0, "total_num_frames": 4}])


def test_video_prompt_logits_and_greedy(checkpoint, video_processed):
    """The video's placeholders (two frame pairs of 2x3 merged patches) cut by a chunk, then
    greedy decoding, against transformers' forward and generate."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        logits = model(**video_processed).logits[0].numpy()
        out = model.generate(**video_processed, max_new_tokens=NUM_NEW, do_sample=False,
                             min_new_tokens=NUM_NEW)
    expected = out[0, video_processed["input_ids"].shape[1]:].tolist()
    assert video_processed["video_grid_thw"][0].tolist() == [2, 4, 6]
    assert float(video_processed["second_per_grid_ts"][0]) == 0.5

    engine = tiny_engine(checkpoint)
    ids = video_processed["input_ids"][0].tolist()
    item = MultimodalItem("vid0", "video", ids.index(VIDEO_PAD), ids.count(VIDEO_PAD),
                          {key: video_processed[key][0].numpy() if key != "pixel_values_videos"
                           else video_processed[key].numpy()
                           for key in ("pixel_values_videos", "video_grid_thw",
                                       "second_per_grid_ts")})
    req = RequestState("r0", ids, len(ids), [list(range(1, 13))], 0)
    req.mm_items = [item]
    assert item.length == 12 and req.num_prompt_tokens == 19
    engine.encode(req, [0])
    tokens = []
    for num_new in (item.offset + 5, req.num_prompt_tokens - item.offset - 5) + (1,) * (NUM_NEW - 1):
        step_logits = np.asarray(engine.forward([(req, num_new)]).logits)[0]
        req.num_computed_tokens += num_new
        if req.num_computed_tokens <= req.num_prompt_tokens:
            np.testing.assert_allclose(step_logits, logits[req.num_computed_tokens - 1],
                                       atol=2e-4, rtol=0)
        if req.num_computed_tokens >= req.num_prompt_tokens:
            tokens.append(int(step_logits.argmax()))
            req.token_ids.append(tokens[-1])
    assert tokens == expected
