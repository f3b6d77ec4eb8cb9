"""Llama 4 images through vLLM's OpenAI server on our engine: a chat request with a PNG data
URL gives transformers' greedy tokens, streamed text equals the non-streamed text; an
unreadable image and too many images get a 400 and the server serves on. Tiny random
checkpoint (tests/multimodal/tiny_llama4_vision.py) with a chat template that renders an
image part as the placeholder string the processor expands into tiles."""

import pytest

from tests.e2e.test_server_qwen2_5_vl import _chat, _data_url, _serve, _streamed_text
from tests.multimodal.tiny_llama4_vision import IMAGE, hf_greedy, image, save_tiny_llama4_vision

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 6  # the Qwen2.5-VL module's _body asks this many
TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
            + IMAGE + "{% elif c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}"
            "{% endfor %}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_llama4_vision(tmp_path_factory.mktemp("tiny_llama4_vision"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    with _serve(checkpoint, tmp_path_factory.mktemp("log") / "server.log", TEMPLATE,
                '{"image": 2}') as url:
        yield url


def test_chat_with_a_png_data_url_then_bad_images_get_a_400(server, checkpoint):
    picture = image(50, 70, seed=0)  # a 2x2 grid of tiles and the global tile
    parts = [_data_url(picture), {"type": "text", "text": "t5 t6 t7"}]
    r = _chat(server, parts, return_token_ids=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["token_ids"] == hf_greedy(checkpoint, f"{IMAGE} t5 t6 t7", [picture], NUM_NEW)
    assert _streamed_text(server, parts) == choice["message"]["content"]

    unreadable = _chat(server, [_data_url(raw=b"not a png"), {"type": "text", "text": "t5"}])
    assert unreadable.status_code == 400 and "image" in unreadable.json()["error"]["message"]
    one = _data_url(image(30, 30, seed=1))
    too_many = _chat(server, [one, one, one, {"type": "text", "text": "t5"}])
    assert too_many.status_code == 400 and "At most 2 image" in too_many.json()["error"]["message"]
    again = _chat(server, parts, return_token_ids=True)
    assert again.status_code == 200 and again.json()["choices"][0]["token_ids"] == \
        choice["token_ids"]
