"""The runner's multimodal step parts, without a model: Qwen2.5-VL's M-RoPE positions for a
prompt with an image (worked out by hand from transformers' get_rope_index rule), and the
encoder rows a step takes when chunked prefill cuts an image."""

import numpy as np
import pytest

from xla_inference.models.interface import MultimodalItem
from xla_inference.models.qwen2_5_vl import Qwen2_5_VLConfig, rope_positions
from xla_inference.runner.multimodal import EncoderCache, multimodal_batch
from xla_inference.runner.requests import BatchLayout, RequestState, build_step_batch

HF = {"architectures": ["Qwen2_5_VLForConditionalGeneration"],
      "text_config": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
                      "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}},
      "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
                        "out_hidden_size": 64}}


def _image(offset, grid=(1, 4, 6), identifier="a"):
    return MultimodalItem(identifier, "image", offset, grid[0] * grid[1] * grid[2] // 4,
                          {"image_grid_thw": np.asarray(grid)})


def test_config_reads_mrope_section_from_text_config():
    cfg = Qwen2_5_VLConfig.from_hf(HF)
    assert cfg.mrope_section == (2, 3, 3) and cfg.qkv_bias and cfg.rope_scaling is None
    old_style = {**HF["text_config"], **{k: v for k, v in HF.items() if k != "text_config"},
                 "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    del old_style["rope_parameters"]
    assert Qwen2_5_VLConfig.from_hf(old_style).mrope_section == (2, 3, 3)


def test_rope_positions_of_a_prompt_with_an_image():
    # 2 text tokens, an image of 4x6 patches (2x3 merged: 6 placeholders), 3 text tokens.
    positions, delta = rope_positions(Qwen2_5_VLConfig.from_hf(HF), 11, [_image(2)])
    expected = np.array([
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 7],  # time: the image is one frame, at 2
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 7],  # height: rows 0..1 after the text
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7],  # width: columns 0..2
    ])
    np.testing.assert_array_equal(positions, expected)
    assert delta == 8 - 11  # the next token (place 11) is at 8 on every row


def test_a_step_takes_the_slice_of_an_image_it_covers():
    cfg = Qwen2_5_VLConfig.from_hf(HF)
    req = RequestState("r", list(range(11)), 11, [[1, 2, 3, 4]], num_computed_tokens=4)
    req.mm_items = [_image(2)]
    cache = EncoderCache()
    rows = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    cache.put("a", rows)
    layout = BatchLayout(num_tokens=8, num_seqs=2, max_blocks=4, block_size=4)
    batch = multimodal_batch(build_step_batch([(req, 5)], layout), [(req, 5)], cache, 8,
                             np.float32, lambda n, items: rope_positions(cfg, n, items))
    # Tokens 4..8: placeholders 4..7 are image rows 2..5, token 8 is text.
    np.testing.assert_array_equal(batch.embeds_mask, [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch.embeds[:4], rows[2:6])
    assert not batch.embeds[4:].any()
    np.testing.assert_array_equal(batch.mrope_positions[:, :5],
                                  rope_positions(cfg, 11, req.mm_items)[0][:, 4:9])
    # After the prompt: place + delta on every row.
    req.num_computed_tokens, req.token_ids = 11, req.token_ids + [7]
    batch = multimodal_batch(build_step_batch([(req, 1)], layout), [(req, 1)], cache, 8,
                             np.float32, None)
    np.testing.assert_array_equal(batch.mrope_positions[:, 0], [8, 8, 8])
    cache.free(["a"])
    req.num_computed_tokens = 2
    with pytest.raises(RuntimeError, match="never encoded"):
        multimodal_batch(build_step_batch([(req, 3)], layout), [(req, 3)], cache, 8,
                         np.float32, None)
