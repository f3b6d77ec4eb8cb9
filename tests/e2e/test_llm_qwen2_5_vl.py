"""Qwen2.5-VL with images through vllm.LLM on our engine (vLLM's own processor, our vision
tower and M-RoPE decoder): greedy output equal to transformers' on a tiny random checkpoint
saved by transformers, with the image's placeholders cut by chunked prefill, alone and
batched with text-only requests and a two-image prompt, and found in the prefix cache; a
video (frames as an array) alone and batched with text and image requests, and found in
the prefix cache."""

import pytest

from tests.e2e.engines import generate_requests, num_compilations, shutdown, start_llm
from tests.multimodal.tiny_qwen2_5_vl import (IMAGE, VIDEO, hf_greedy, hf_video_greedy, image,
                                              save_tiny_qwen2_5_vl, video_frames,
                                              video_metadata)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 8
PROMPTS = [f"t5 t6 {IMAGE} t7 t8 t9", f"t40 {IMAGE} t41 t42 t43 t44"]
TEXT_ONLY = ["t11 t12 t13", "t20 t21 t22 t23 t24 t25 t26", "t30 t31"]
TWO_IMAGES = f"t60 {IMAGE} t61 {IMAGE} t62 t63"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"))


@pytest.fixture(scope="module")
def images():
    return [image(112, 168, seed=0), image(84, 140, seed=1)]  # 24 and 15 placeholders


@pytest.fixture(scope="module")
def llm(checkpoint):
    # 16 tokens a step: the 24 placeholders of the first image span two steps or more.
    # The first image's size and the video's frame size are warmed up (their encoder
    # programs compiled at start-up).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XLA_INFERENCE_IMAGE_SIZES", "112x168,56x84")
        llm = start_llm(checkpoint, max_num_batched_tokens=16, max_num_seqs=4,
                        kv_cache_memory_bytes=1 << 20)
    yield llm
    shutdown(llm)


def _generate(llm, requests):
    return generate_requests(llm, requests, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)


def test_image_prompt_greedy_equals_transformers(llm, checkpoint, images):
    expected = hf_greedy(checkpoint, PROMPTS[0], [images[0]], NUM_NEW)
    before = num_compilations(llm)
    got = _generate(llm, [{"prompt": PROMPTS[0], "multi_modal_data": {"image": images[0]}}])
    assert got == [expected]
    assert num_compilations(llm) == before  # its size was warmed up: nothing compiled


def test_images_batched_with_text_requests(llm, checkpoint, images):
    requests = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(PROMPTS, images)]
    requests += [{"prompt": p} for p in TEXT_ONLY]
    two = [images[1], image(56, 56, seed=2)]  # two images in one prompt: 15 + 4 placeholders
    requests.append({"prompt": TWO_IMAGES, "multi_modal_data": {"image": two}})
    expected = [hf_greedy(checkpoint, p, [im], NUM_NEW) for p, im in zip(PROMPTS, images)]
    expected += [hf_greedy(checkpoint, p, [], NUM_NEW) for p in TEXT_ONLY]
    expected.append(hf_greedy(checkpoint, TWO_IMAGES, two, NUM_NEW))
    before = num_compilations(llm)
    assert _generate(llm, requests) == expected
    # Built after warm-up: only the vision tower of the two image sizes not warmed up.
    assert num_compilations(llm) - before == 2


def test_prefix_cache_hit_covering_an_image(llm, checkpoint, images):
    """The same image prompt twice: the second finds the image's placeholders in the prefix
    cache (vLLM sends the item without pixels and schedules no encoder for it) and still
    needs its grid for the rope positions of the tokens after it."""
    from tests.e2e.engines import metric

    text = " ".join(f"t{i}" for i in range(50, 70))
    prompt = f"{IMAGE} {text}"  # placeholders 1..15: all in the first 16-token page
    request = {"prompt": prompt, "multi_modal_data": {"image": images[1]}}
    expected = hf_greedy(checkpoint, prompt, [images[1]], NUM_NEW)
    assert _generate(llm, [request]) == [expected]
    hits = metric(llm, "vllm:prefix_cache_hits")
    assert _generate(llm, [request]) == [expected]
    assert metric(llm, "vllm:prefix_cache_hits") - hits >= 16


def test_video_batched_with_text_requests(llm, checkpoint, images):
    """Four frames given as an array with their metadata (nothing to decode): two frame
    pairs 0.5 s apart, 12 placeholders cut by the 16-token steps; alone (its frame size
    warmed up as an image size: nothing compiled), then beside a text-only and an image
    request."""
    frames = video_frames(4, 56, 84, seed=3)
    video = (frames, video_metadata(4, fps=4.0))
    prompt = f"t5 t6 {VIDEO} t7 t8 t9"
    requests = [{"prompt": prompt, "multi_modal_data": {"video": video}}, {"prompt": TEXT_ONLY[1]},
                {"prompt": PROMPTS[1], "multi_modal_data": {"image": images[1]}}]
    expected = [hf_video_greedy(checkpoint, prompt, frames, 4.0, NUM_NEW),
                hf_greedy(checkpoint, TEXT_ONLY[1], [], NUM_NEW),
                hf_greedy(checkpoint, PROMPTS[1], [images[1]], NUM_NEW)]
    before = num_compilations(llm)
    assert _generate(llm, requests[:1]) == expected[:1]
    assert num_compilations(llm) == before
    assert _generate(llm, requests) == expected


def test_prefix_cache_hit_covering_a_video(llm, checkpoint):
    """The video's 14 tokens (placeholders and their start/end) inside the first 16-token
    page: the second request finds them cached; its rope positions still need the video's
    grid and time scale (kept on the host by vLLM for M-RoPE models)."""
    from tests.e2e.engines import metric

    frames = video_frames(4, 56, 84, seed=6)
    prompt = f"{VIDEO} " + " ".join(f"t{i}" for i in range(50, 70))
    request = {"prompt": prompt, "multi_modal_data": {"video": (frames, video_metadata(4, 4.0))}}
    expected = hf_video_greedy(checkpoint, prompt, frames, 4.0, NUM_NEW)
    assert _generate(llm, [request]) == [expected]
    hits = metric(llm, "vllm:prefix_cache_hits")
    assert _generate(llm, [request]) == [expected]
    assert metric(llm, "vllm:prefix_cache_hits") - hits >= 16
