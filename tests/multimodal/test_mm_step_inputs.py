"""What a multimodal engine compiles and copies, on a tiny Qwen2.5-VL (no vLLM): the tower's
warm-up builds the program of the one pixel dtype the processor delivers (the other compiles
at its first item only); a step with no multimodal token passes the bucket's zeroed rows
already on the device, runs the same program as a step with an image, and gives the logits
of zeros built on the host. (Against transformers: tests/multimodal/test_qwen2_5_vl_model.py
runs text-only decode steps and chunks; the e2e tests count the compiles while serving.)"""

import numpy as np
import pytest

from tests.helpers import tiny_engine
from tests.multimodal.tiny_qwen2_5_vl import IMAGE_PAD, save_tiny_qwen2_5_vl
from xla_inference.models.interface import PIXEL_AFFINE, MultimodalItem
from xla_inference.multimodal.qwen2_5_vl_vision import encoder_for_grid
from xla_inference.runner.multimodal import multimodal_batch
from xla_inference.runner.requests import RequestState, build_step_batch

pytestmark = pytest.mark.slow  # transformers builds and saves the checkpoint

GRID = (1, 6, 10)  # (t, h, w) patches: 15 placeholders; a grid no other test compiles


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return tiny_engine(save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl")))


def _item(identifier, dtype, seed=0):
    rng = np.random.default_rng(seed)
    rows = int(np.prod(GRID))
    data = {"image_grid_thw": np.asarray(GRID)}
    if dtype == np.uint8:
        data["pixel_values"] = rng.integers(0, 256, (rows, 3 * 2 * 14 * 14), np.uint8)
        data[PIXEL_AFFINE] = np.stack([np.full(3, 1 / 255), np.full(3, -0.5)]).astype(np.float32)
    else:
        data["pixel_values"] = rng.standard_normal((rows, 3 * 2 * 14 * 14)).astype(np.float32)
    return MultimodalItem(identifier, "image", 2, rows // 4, data)


def test_warm_up_compiles_the_delivered_pixel_dtype_only(engine):
    mm, cfg = engine.model.multimodal, engine.model_cfg
    tower = encoder_for_grid(cfg.vision, GRID)
    assert tower._cache_size() == 0
    mm.warm_up(engine.params, cfg, GRID, np.uint8)  # mm_device_do_normalize on: raw pixels
    assert tower._cache_size() == 1
    mm.encode(engine.params, cfg, _item("raw", np.uint8))
    assert tower._cache_size() == 1  # what the processor delivers: warmed up
    mm.encode(engine.params, cfg, _item("normalized", np.float32))
    assert tower._cache_size() == 2  # the other dtype, should it come: at its first item


def _text_request(req_id, length, first_block, seed):
    tokens = np.random.default_rng(seed).integers(3, 290, length).tolist()
    return RequestState(req_id, tokens, length, [list(range(first_block, first_block + 8))], 0)


def _image_request(engine):
    item = _item("img", np.uint8, seed=1)
    tokens = [5, 6] + [IMAGE_PAD] * item.length + [7, 8]
    req = RequestState("i", tokens, len(tokens), [list(range(20, 28))], 0)
    req.mm_items = [item]
    engine.encode(req, [0])
    return req


def test_text_only_steps_pass_the_device_placeholders(engine):
    from xla_inference.runner import compile_counter

    image_req = _image_request(engine)  # encoded now: its tower compiles outside the count
    text = _text_request("t", 20, 1, seed=2)  # 20 tokens and the image prompt's 19: one bucket
    scheduled = [(text, 20)]
    layout = engine.layout_for(20)
    assert engine.layout_for(image_req.num_prompt_tokens).num_tokens == layout.num_tokens
    # The bucket's step compiled as warm-up compiles it (on its empty batch).
    warm = engine._with_multimodal(build_step_batch([], layout), [])
    engine._forward.compiled[layout.num_tokens] = engine.lower_step(warm).compile()
    compile_counter.install()
    before = compile_counter.num_compilations()

    batch = engine._with_multimodal(build_step_batch(scheduled, layout), scheduled)
    blank_embeds, blank_mask = engine._blank_embeds(layout.num_tokens)
    assert batch.embeds is blank_embeds and batch.embeds_mask is blank_mask  # no host array
    assert not np.asarray(blank_embeds).any() and not np.asarray(blank_mask).any()
    got = np.asarray(engine.forward(scheduled).logits)

    # The same step with zeros built on the host (as every step did before).
    embed = engine.params.embed
    host = multimodal_batch(build_step_batch(scheduled, layout), scheduled, engine.encoder_cache,
                            embed.shape[-1], embed.dtype, None)
    assert isinstance(host.embeds, np.ndarray)
    engine.kv_cache, want, *_ = engine._forward(engine._step_params(), engine.kv_cache, host,
                                                 np.asarray(False))
    np.testing.assert_array_equal(got[:1], np.asarray(want)[:1])

    # A step with an image builds its rows on the host and runs the same program.
    scheduled = [(image_req, image_req.num_prompt_tokens)]
    batch = engine._with_multimodal(build_step_batch(scheduled, layout), scheduled)
    assert isinstance(batch.embeds, np.ndarray) and batch.embeds_mask.sum() == 15
    image_logits = np.asarray(engine.forward(scheduled).logits)
    assert np.isfinite(image_logits).all()
    assert compile_counter.num_compilations() == before  # neither kind compiled anything
