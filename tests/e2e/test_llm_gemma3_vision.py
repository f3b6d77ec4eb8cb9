"""Gemma 3 with images through vllm.LLM on our engine (vLLM's own gemma3_mm processor, our
SigLIP tower, projector and decoder with each image's tokens attending both ways): greedy
output equal to transformers' on a tiny random checkpoint saved by transformers, alone and
batched with text-only requests (the image's placeholders scheduled whole), no compile
after warm-up; an image past the sliding window and a video refused per request."""

import pytest

from tests.e2e.engines import generate_requests, num_compilations, shutdown, start_llm
from tests.multimodal.tiny_gemma3_vision import IMAGE, hf_greedy, image, save_tiny_gemma3_vision

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 8
PROMPT = f"t5 t6 {IMAGE} t7 t8 t9"
TEXT_ONLY = ["t20 t21 t22 t23 t24 t25 t26", "t11 t12 t13", "t30 t31"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_gemma3_vision(tmp_path_factory.mktemp("tiny_gemma3_vision"))


@pytest.fixture(scope="module")
def images():
    return [image(50, 70, seed=0), image(64, 64, seed=1)]


@pytest.fixture(scope="module")
def llm(checkpoint):
    # 24 tokens a step: chunked prefill would cut an image's 18 placeholders; vLLM must
    # schedule them whole (disable_chunked_mm_input, set by the platform).
    llm = start_llm(checkpoint, max_num_batched_tokens=24, max_num_seqs=4,
                    kv_cache_memory_bytes=1 << 20)
    yield llm
    shutdown(llm)


def _generate(llm, requests):
    return generate_requests(llm, requests, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)


def test_scheduler_keeps_images_whole(llm):
    config = llm.llm_engine.vllm_config.scheduler_config
    assert config.disable_chunked_mm_input


def test_pixels_come_raw_for_our_tower_to_normalize(llm):
    # vLLM's processor hands over uint8 pixels; the greedy tests below prove the tower's
    # normalization of them (models/gemma3_mm.encode).
    assert llm.llm_engine.vllm_config.model_config.multimodal_config.mm_device_do_normalize


def test_image_prompt_greedy_equals_transformers(llm, checkpoint, images):
    expected = hf_greedy(checkpoint, PROMPT, [images[0]], NUM_NEW)
    before = num_compilations(llm)
    got = _generate(llm, [{"prompt": PROMPT, "multi_modal_data": {"image": images[0]}}])
    assert got == [expected]
    assert num_compilations(llm) == before  # the one image size was warmed up


def test_image_alone_and_batched_with_text_requests(llm, checkpoint, images):
    alone = _generate(llm, [{"prompt": PROMPT, "multi_modal_data": {"image": images[1]}}])
    # A 7-token text request first: the image request's 23 tokens do not fit in the rest
    # of the 24-token step, which would cut its image; vLLM schedules up to the image.
    requests = [{"prompt": p} for p in TEXT_ONLY]
    requests.insert(1, {"prompt": PROMPT, "multi_modal_data": {"image": images[1]}})
    two = f"t60 {IMAGE} t61 {IMAGE} t62"
    requests.append({"prompt": two, "multi_modal_data": {"image": images}})
    expected = [hf_greedy(checkpoint, p, [], NUM_NEW) for p in TEXT_ONLY]
    expected.insert(1, hf_greedy(checkpoint, PROMPT, [images[1]], NUM_NEW))
    expected.append(hf_greedy(checkpoint, two, images, NUM_NEW))
    before = num_compilations(llm)
    got = _generate(llm, requests)
    assert got[1] == alone[0]
    assert got == expected
    assert num_compilations(llm) == before


def test_image_past_the_sliding_window_is_refused(llm, images):
    text = " ".join(f"t{i}" for i in range(40, 80))  # the image would end past position 48
    with pytest.raises(Exception, match="sliding window"):
        _generate(llm, [{"prompt": f"{text} {IMAGE}", "multi_modal_data": {"image": images[0]}}])
    assert _generate(llm, [{"prompt": "t11 t12 t13"}])  # and the engine keeps serving


def test_prefix_cache_hit_inside_an_image(llm, checkpoint, images):
    """The same image prompt twice: the second finds the first 16-token page (which ends
    inside the image's soft tokens) in the prefix cache; the image's remaining tokens still
    attend to the whole image."""
    from tests.e2e.engines import metric

    prompt = f"t5 t6 {IMAGE} " + " ".join(f"t{i}" for i in range(50, 60))
    request = {"prompt": prompt, "multi_modal_data": {"image": images[0]}}
    expected = hf_greedy(checkpoint, prompt, [images[0]], NUM_NEW)
    assert _generate(llm, [request]) == [expected]
    hits = metric(llm, "vllm:prefix_cache_hits")
    assert _generate(llm, [request]) == [expected]
    assert metric(llm, "vllm:prefix_cache_hits") - hits >= 16


def test_video_is_refused(llm):
    """Gemma 3 takes images only: vLLM's processor refuses a video per request (its limit is
    0), and the engine serves on."""
    import numpy as np

    frames = np.zeros((2, 56, 56, 3), np.uint8)
    video = (frames, {"fps": 2.0, "duration": 1.0, "total_num_frames": 2,
                      "frames_indices": [0, 1], "video_backend": "opencv"})
    with pytest.raises(Exception, match="At most 0 video"):
        _generate(llm, [{"prompt": "t5 t6", "multi_modal_data": {"video": video}}])
    assert _generate(llm, [{"prompt": "t11 t12 t13"}])
