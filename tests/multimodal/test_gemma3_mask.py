"""Gemma 3's multimodal step parts, without a model or transformers: which placeholder
tokens take encoder rows (the soft tokens, not the image's begin/end tokens), the position
each token attends up to (a soft token: its image's last), and the config of a Hub
checkpoint, which leaves transformers' defaults out."""

import numpy as np

from xla_inference.models.gemma3_mm import Gemma3MMConfig, _mask_positions, rope_positions
from xla_inference.models.interface import MultimodalItem
from xla_inference.runner.multimodal import EncoderCache, multimodal_batch
from xla_inference.runner.requests import BatchLayout, RequestState, build_step_batch

# google/gemma-3-4b-it's config.json (the fields that matter here).
HUB_4B = {"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
          "eoi_token_index": 256000, "image_token_index": 262144, "mm_tokens_per_image": 256,
          "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                          "model_type": "gemma3_text", "num_hidden_layers": 34,
                          "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                          "sliding_window": 1024},
          "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                            "model_type": "siglip_vision_model", "num_attention_heads": 16,
                            "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}}


def test_hub_config_takes_transformers_defaults():
    cfg = Gemma3MMConfig.from_hf(HUB_4B)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (8, 4, 256, 262_208)
    assert cfg.layer_types[5] == "full_attention" and cfg.layer_types[4] == "sliding_attention"
    assert cfg.bidirectional_limit == 1024 and cfg.rope_scaling == (("factor", 8.0),
                                                                    ("rope_type", "linear"))
    assert cfg.vision.patches_per_side == 64 and cfg.vision.tokens_per_side == 16
    assert cfg.image_token_id == 262144 and cfg.tie_word_embeddings


def _item(offset, identifier="a"):
    # <boi>, 4 soft tokens, <eoi>
    return MultimodalItem(identifier, "image", offset, 6, None,
                          np.array([False, True, True, True, True, False]))


def test_soft_tokens_take_the_rows_and_attend_to_their_image_end():
    cfg = Gemma3MMConfig.from_hf(HUB_4B)
    # Request a: 2 text tokens, the image (places 2..7, soft tokens 3..6), 2 text tokens;
    # request b: an image right at its start (places 0..5), then 1 text token.
    a = RequestState("a", list(range(10)), 10, [[1, 2, 3]], 0)
    b = RequestState("b", list(range(7)), 7, [[4, 5]], 0)
    a.mm_items, b.mm_items = [_item(2, "a")], [_item(0, "b")]
    cache = EncoderCache()
    rows = {"a": np.arange(16, dtype=np.float32).reshape(4, 4),
            "b": -np.arange(1, 17, dtype=np.float32).reshape(4, 4)}
    for name, value in rows.items():
        cache.put(name, value)
    layout = BatchLayout(num_tokens=24, num_seqs=4, max_blocks=3, block_size=4)
    scheduled = [(a, 10), (b, 7)]
    batch = multimodal_batch(build_step_batch(scheduled, layout), scheduled, cache, 4,
                             np.float32, lambda n, items: rope_positions(cfg, n, items))
    mask = np.asarray(batch.embeds_mask)
    np.testing.assert_array_equal(np.flatnonzero(mask), [3, 4, 5, 6, 11, 12, 13, 14])
    np.testing.assert_array_equal(batch.embeds[3:7], rows["a"])
    np.testing.assert_array_equal(batch.embeds[11:15], rows["b"])
    limits = np.asarray(_mask_positions(batch))
    np.testing.assert_array_equal(limits[:10], [0, 1, 2, 6, 6, 6, 6, 7, 8, 9])
    np.testing.assert_array_equal(limits[10:17], [0, 4, 4, 4, 4, 5, 6])


def test_a_step_that_starts_inside_an_image_takes_its_remaining_rows():
    """A prefix-cache hit may end inside an image: the step's soft tokens are the image's
    last ones and still attend up to its end."""
    cfg = Gemma3MMConfig.from_hf(HUB_4B)
    a = RequestState("a", list(range(10)), 10, [[1, 2, 3]], num_computed_tokens=4)
    a.mm_items = [_item(2)]
    cache = EncoderCache()
    cache.put("a", np.arange(16, dtype=np.float32).reshape(4, 4))
    layout = BatchLayout(num_tokens=8, num_seqs=2, max_blocks=3, block_size=4)
    batch = multimodal_batch(build_step_batch([(a, 6)], layout), [(a, 6)], cache, 4,
                             np.float32, lambda n, items: rope_positions(cfg, n, items))
    # Places 4..9: soft tokens 4, 5, 6 are the image's rows 1..3.
    np.testing.assert_array_equal(np.flatnonzero(batch.embeds_mask), [0, 1, 2])
    np.testing.assert_array_equal(batch.embeds[:3], np.arange(16).reshape(4, 4)[1:])
    np.testing.assert_array_equal(np.asarray(_mask_positions(batch))[:6], [6, 6, 6, 7, 8, 9])
