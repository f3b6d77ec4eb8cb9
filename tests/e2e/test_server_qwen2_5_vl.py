"""Qwen2.5-VL images through vLLM's OpenAI server on our engine: a chat request with a PNG
data URL gives transformers' greedy tokens, streamed text equals the non-streamed text; an
unreadable image, too many images and an image too big for the engine get a 400 with
vLLM's message, and the server keeps serving; a video sent as a data URL of JPEG frames
(video/jpeg: nothing to decode but the frames) or of an MP4 (OpenCV decodes it) gives
transformers' tokens for those frames. Tiny random checkpoint
(tests/multimodal/tiny_qwen2_5_vl.py) with a chat template that renders an image or video
part as the placeholder string."""

import base64
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.servers import free_port, stop_server, wait_healthy
from tests.multimodal.tiny_qwen2_5_vl import (IMAGE, VIDEO, hf_greedy, hf_video_greedy, image,
                                              save_tiny_qwen2_5_vl, video_frames)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 6
TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
            + IMAGE + "{% elif c['type'] == 'video' %}" + VIDEO
            + "{% elif c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}"
            "{% endfor %}")


@contextlib.contextmanager
def _serve(model_dir: Path, log_path: Path, chat_template: str = TEMPLATE,
           limits: str = '{"image": 2, "video": 1}'):
    """A server on the tiny checkpoint with `chat_template`, 16 tokens a step (an image's
    placeholders cut across steps), at most `limits` items a prompt."""
    template = model_dir / "chat_template.jinja"
    template.write_text(chat_template)
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "4",
           "--max-num-batched-tokens", "16", "--kv-cache-memory-bytes", str(1 << 20),
           "--chat-template", str(template), "--limit-mm-per-prompt", limits,
           # JPEG frame sequences carry no rate: frame pairs 0.5 s apart (vLLM's default is 1).
           "--media-io-kwargs", '{"video": {"fps": 4.0}}']
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log_path, 600)
        yield url + "/v1"
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    with _serve(checkpoint, tmp_path_factory.mktemp("log") / "server.log") as url:
        yield url


def _data_url(picture=None, raw: bytes | None = None) -> dict:
    if raw is None:
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        raw = buffer.getvalue()
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def _body(parts: list, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": parts}],
            "max_tokens": NUM_NEW, "temperature": 0.0, "ignore_eos": True, **extra}


def _chat(url: str, parts: list, **extra) -> httpx.Response:
    return httpx.post(url + "/chat/completions", json=_body(parts, **extra), timeout=120)


def _streamed_text(url: str, parts: list) -> str:
    text = []
    with httpx.stream("POST", url + "/chat/completions", json=_body(parts, stream=True),
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
    return "".join(text)


def test_chat_with_a_png_data_url(server, checkpoint):
    picture = image(112, 168, seed=0)
    parts = [_data_url(picture), {"type": "text", "text": "t5 t6 t7"}]
    r = _chat(server, parts, return_token_ids=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["token_ids"] == hf_greedy(checkpoint, f"{IMAGE} t5 t6 t7", [picture], NUM_NEW)
    assert _streamed_text(server, parts) == choice["message"]["content"]


def test_bad_images_get_a_400_and_the_server_serves_on(server):
    unreadable = _chat(server, [_data_url(raw=b"not a png"), {"type": "text", "text": "t5"}])
    assert unreadable.status_code == 400 and "image" in unreadable.json()["error"]["message"]
    one = _data_url(image(56, 56, seed=1))
    too_many = _chat(server, [one, one, one, {"type": "text", "text": "t5"}])
    assert too_many.status_code == 400 and "At most 2 image" in too_many.json()["error"]["message"]
    # The processor shrinks a big image to its max_pixels (560 x 560: served, 67 prompt
    # tokens); two of them are past what this engine takes for one prompt (--max-model-len
    # 128): refused before they reach the encoder.
    big = _data_url(image(560, 560, seed=2))
    assert _chat(server, [big, {"type": "text", "text": "t5"}]).status_code == 200
    too_big = _chat(server, [big, big, {"type": "text", "text": "t5"}])
    assert too_big.status_code == 400, too_big.text
    assert _chat(server, [one, {"type": "text", "text": "t5"}]).status_code == 200


def _jpeg_frames_url(frames) -> tuple[dict, list]:
    """A video/jpeg data URL (vLLM's frame-sequence format: base64 JPEGs joined by commas)
    and the frames as PIL decodes them back (JPEG is lossy)."""
    from PIL import Image

    encoded, decoded = [], []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
        decoded.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    url = "data:video/jpeg;base64," + ",".join(encoded)
    return {"type": "video_url", "video_url": {"url": url}}, np.stack(decoded)


def test_chat_with_a_video_of_jpeg_frames(server, checkpoint):
    part, frames = _jpeg_frames_url(video_frames(4, 56, 84, seed=3))
    parts = [{"type": "text", "text": "t5"}, part, {"type": "text", "text": "t6 t7"}]
    r = _chat(server, parts, return_token_ids=True)
    assert r.status_code == 200, r.text
    expected = hf_video_greedy(checkpoint, f" t5{VIDEO} t6 t7", frames, 4.0, NUM_NEW)
    assert r.json()["choices"][0]["token_ids"] == expected


def test_bad_videos_get_a_400(server):
    unreadable = {"type": "video_url", "video_url": {"url": "data:video/jpeg;base64,bm90IGEganBn"}}
    r = _chat(server, [unreadable, {"type": "text", "text": "t5"}])
    assert r.status_code == 400, r.text
    part, _ = _jpeg_frames_url(video_frames(2, 56, 56, seed=4))
    too_many = _chat(server, [part, part, {"type": "text", "text": "t5"}])
    assert too_many.status_code == 400 and "At most 1 video" in too_many.json()["error"]["message"]
    assert _chat(server, [part, {"type": "text", "text": "t5"}]).status_code == 200


def test_chat_with_an_mp4_data_url(server, checkpoint, tmp_path):
    """An MP4 (written and read back by OpenCV, vLLM's default video loader): the frames
    OpenCV decodes, at the file's 4 fps, give transformers' tokens."""
    import cv2

    path = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (84, 56))
    for frame in video_frames(4, 56, 84, seed=5):
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))  # OpenCV writes BGR
    writer.release()
    capture, decoded = cv2.VideoCapture(path), []
    while (frame := capture.read())[0]:
        decoded.append(frame[1][:, :, ::-1])
    capture.release()
    url = "data:video/mp4;base64," + base64.b64encode(Path(path).read_bytes()).decode()
    parts = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "t8"}]
    r = _chat(server, parts, return_token_ids=True)
    assert r.status_code == 200, r.text
    expected = hf_video_greedy(checkpoint, f"{VIDEO} t8", np.stack(decoded), 4.0, NUM_NEW)
    assert len(decoded) == 4 and r.json()["choices"][0]["token_ids"] == expected
