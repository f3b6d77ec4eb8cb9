"""M-RoPE positions of Qwen2.5-VL prompts with videos (models/qwen2_5_vl.rope_positions):
equal to transformers' get_rope_index where the video's time positions stay inside its
spatial extent, and to vLLM's get_mrope_input_positions (the original Qwen2.5-VL rule) for
a long video, where transformers 5.x counts the text after the video on from the video's
height and width only."""

import types

import numpy as np
import pytest

from xla_inference.models.interface import MultimodalItem
from xla_inference.models.qwen2_5_vl import Qwen2_5_VLConfig

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # transformers' and vLLM's model modules

TOKENS_PER_SECOND = 4
VIDEO, IMAGE = 2, 1  # transformers' mm_token_type_ids


def _configs():
    from transformers import Qwen2_5_VLConfig as HFConfig

    hf = HFConfig(text_config={"hidden_size": 64, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "num_hidden_layers": 1,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                   "mrope_section": [2, 3, 3]}},
                  vision_config={"depth": 1, "hidden_size": 32, "num_heads": 2,
                                 "out_hidden_size": 64, "tokens_per_second": TOKENS_PER_SECOND})
    return hf, Qwen2_5_VLConfig.from_hf(hf.to_dict())


def _prompt(pieces):
    """pieces: ("text", n) or (modality, (t, h, w), seconds per grid) -> token types [P] and
    our items (placeholders: t*h*w/4 tokens per item)."""
    types_, items = [], []
    for piece in pieces:
        if piece[0] == "text":
            types_ += [0] * piece[1]
            continue
        modality, grid, seconds = piece
        data = {f"{modality}_grid_thw": np.asarray(grid)}
        if modality == "video":
            data["second_per_grid_ts"] = np.asarray([seconds], np.float32)
        length = int(np.prod(grid)) // 4
        items.append(MultimodalItem(f"item{len(items)}", modality, len(types_), length, data))
        types_ += [VIDEO if modality == "video" else IMAGE] * length
    return np.asarray(types_), items


def _transformers_positions(hf, token_types, items):
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    model = types.SimpleNamespace(config=hf)  # get_rope_index reads only the config
    model.get_vision_position_ids = lambda *a, **k: Qwen2_5_VLModel.get_vision_position_ids(
        model, *a, **k)
    grids = {m: [i.data[f"{m}_grid_thw"] for i in items if i.modality == m]
             for m in ("image", "video")}
    seconds = [float(i.data["second_per_grid_ts"][0]) for i in items if i.modality == "video"]
    positions, delta = Qwen2_5_VLModel.get_rope_index(
        model, torch.zeros((1, len(token_types)), dtype=torch.long),
        torch.from_numpy(token_types)[None],
        image_grid_thw=torch.tensor(np.stack(grids["image"])) if grids["image"] else None,
        video_grid_thw=torch.tensor(np.stack(grids["video"])),
        second_per_grid_ts=torch.tensor(seconds))
    return positions[:, 0].numpy(), int(delta[0, 0])


def _vllm_positions(hf, num_tokens, items):
    import torch
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as VllmModel

    model = types.SimpleNamespace(config=hf)
    model.iter_mm_grid_thw = lambda features: VllmModel.iter_mm_grid_thw(model, features)
    features = [types.SimpleNamespace(
        modality=i.modality, mm_position=types.SimpleNamespace(offset=i.offset),
        data={k: types.SimpleNamespace(data=torch.from_numpy(np.asarray(v)))
              for k, v in i.data.items()}) for i in items]
    positions, delta = VllmModel.get_mrope_input_positions(model, [0] * num_tokens, features)
    return np.asarray(positions), int(delta)


# Time positions that stay below the merged frame's larger side, where both rules agree:
# frame pairs 0.5 s apart (fps 4: time 0, 2, ...): two in a 4x6 merged frame; an image,
# then three in a 6x6 frame.
AGREEING = [
    [("text", 3), ("video", (2, 8, 12), 0.5), ("text", 4)],
    [("text", 2), ("image", (1, 4, 6), None), ("text", 1), ("video", (3, 12, 12), 0.5),
     ("text", 3)],
]


@pytest.mark.parametrize("pieces", AGREEING, ids=["one_video", "image_and_video"])
def test_video_positions_equal_transformers(pieces):
    hf, cfg = _configs()
    token_types, items = _prompt(pieces)
    from xla_inference.models.qwen2_5_vl import rope_positions

    ours, delta = rope_positions(cfg, len(token_types), items)
    expected, expected_delta = _transformers_positions(hf, token_types, items)
    np.testing.assert_array_equal(ours, expected)
    assert delta == expected_delta
    video = items[-1]
    times = ours[0, video.offset:video.offset + video.length]
    steps = np.unique(times) - times.min()
    assert steps.tolist() == list(range(0, 2 * len(steps), 2))  # frame pairs 2 positions apart


def test_long_video_follows_vllm():
    """Three frame pairs 1 s apart in a 2x2 merged frame: time positions 0, 4, 8 pass the
    frame's extent; the text after the video counts on from its largest position (vLLM, the
    original Qwen2.5-VL), where transformers 5.x counts on from its height and width only
    (2 + 2), below the video's last time position, while its decode positions follow the
    largest one."""
    from xla_inference.models.qwen2_5_vl import rope_positions

    hf, cfg = _configs()
    token_types, items = _prompt([("text", 2), ("video", (3, 4, 4), 1.0), ("text", 3)])
    ours, delta = rope_positions(cfg, len(token_types), items)
    expected, expected_delta = _vllm_positions(hf, len(token_types), items)
    np.testing.assert_array_equal(ours, expected)
    assert delta == expected_delta
    assert ours[:, -3].tolist() == [2 + 8 + 1] * 3
    transformers_positions, _ = _transformers_positions(hf, token_types, items)
    assert transformers_positions[:, -3].tolist() == [2 + 2] * 3  # the rule we do not follow
