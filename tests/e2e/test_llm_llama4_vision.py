"""Llama 4 with images through vllm.LLM on our engine (vLLM's own mllama4 processor and its
tiles, our vision tower, adapter, projector and Llama 4 decoder): greedy output equal to
transformers' on a tiny random checkpoint saved by transformers, alone and batched with
text-only requests in steps that cut an image's placeholders, no compile after warm-up."""

import pytest

from tests.e2e.engines import generate_requests, num_compilations, shutdown, start_llm
from tests.multimodal.tiny_llama4_vision import IMAGE, hf_greedy, image, save_tiny_llama4_vision

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 6
PROMPT = f"t5 t6 {IMAGE} t7 t8 t9"
TEXT_ONLY = ["t20 t21 t22 t23 t24 t25 t26", "t11 t12 t13"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_llama4_vision(tmp_path_factory.mktemp("tiny_llama4_vision"))


@pytest.fixture(scope="module")
def llm(checkpoint):
    # 16 tokens a step: a 2x2-tile image's 27 placeholders are cut across steps (Llama 4's
    # attention is causal, so vLLM may chunk them).
    llm = start_llm(checkpoint, max_num_batched_tokens=16, max_num_seqs=4,
                    kv_cache_memory_bytes=1 << 20)
    yield llm
    shutdown(llm)


def _generate(llm, requests):
    return generate_requests(llm, requests, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)


def test_image_prompt_greedy_equals_transformers(llm, checkpoint):
    assert not llm.llm_engine.vllm_config.scheduler_config.disable_chunked_mm_input
    picture = image(50, 70, seed=0)  # a 2x2 grid of tiles and the global tile
    expected = hf_greedy(checkpoint, PROMPT, [picture], NUM_NEW)
    before = num_compilations(llm)
    got = _generate(llm, [{"prompt": PROMPT, "multi_modal_data": {"image": picture}}])
    assert got == [expected]
    assert num_compilations(llm) == before  # the tile size was warmed up


def test_images_batched_with_text_requests(llm, checkpoint):
    one_tile, wide = image(30, 30, seed=1), image(40, 120, seed=2)  # 1 tile; 1x3 and the global
    two = f"t60 {IMAGE} t61 {IMAGE} t62"
    requests = [{"prompt": p} for p in TEXT_ONLY]
    requests.insert(1, {"prompt": PROMPT, "multi_modal_data": {"image": one_tile}})
    requests.append({"prompt": two, "multi_modal_data": {"image": [wide, one_tile]}})
    expected = [hf_greedy(checkpoint, p, [], NUM_NEW) for p in TEXT_ONLY]
    expected.insert(1, hf_greedy(checkpoint, PROMPT, [one_tile], NUM_NEW))
    expected.append(hf_greedy(checkpoint, two, [wide, one_tile], NUM_NEW))
    before = num_compilations(llm)
    got = _generate(llm, requests)
    assert got == expected
    assert num_compilations(llm) == before
