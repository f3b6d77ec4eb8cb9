"""A vision tower or projector saved quantized (int8, FP8, or with a weight_scale /
weight_packed / qweight companion) is refused naming the tower, for each family's tower
(multimodal/weights.float32_reader), where it used to be cast to float32 without its
scale. The same checkpoint saved as float loads."""

from collections.abc import Mapping

import ml_dtypes
import numpy as np
import pytest

from xla_inference.loading.params import WeightMismatchError
from xla_inference.multimodal import gemma3_vision, llama4_vision, qwen2_5_vl_vision

WIDTH = 8


class _Recorder(Mapping):
    """Every name exists, float32 [WIDTH, WIDTH]: learns which tensors a tower reads."""

    def __init__(self):
        self.read = []

    def __getitem__(self, name):
        self.read.append(name)
        return np.zeros((WIDTH, WIDTH), np.float32)

    def __contains__(self, name):
        return True

    def __iter__(self):
        return iter(self.read)

    def __len__(self):
        return len(self.read)


def _towers():
    """(tower name in the refusal, vision_params(tensors))."""
    llama4 = llama4_vision.Llama4VisionConfig(
        hidden_size=WIDTH, intermediate_size=WIDTH, num_layers=1, num_heads=2, image_size=8,
        patch_size=4, pixel_shuffle_ratio=0.5, projector_input_dim=WIDTH,
        projector_output_dim=WIDTH, text_hidden_size=WIDTH)
    gemma3 = gemma3_vision.Gemma3VisionConfig(
        hidden_size=WIDTH, intermediate_size=WIDTH, num_layers=1, num_heads=2, image_size=8,
        patch_size=4, text_hidden_size=WIDTH, mm_tokens_per_image=4)
    qwen = qwen2_5_vl_vision.VisionConfig(depth=1, hidden_size=WIDTH, intermediate_size=WIDTH,
                                          num_heads=2, out_hidden_size=WIDTH)
    return {"Llama 4": lambda t: llama4_vision.vision_params(t, llama4),
            "Gemma 3": lambda t: gemma3_vision.vision_params(t, gemma3),
            "Qwen2.5-VL": lambda t: qwen2_5_vl_vision.vision_params(t, qwen)}


def _checkpoint(load) -> dict:
    """A tiny float checkpoint holding exactly the tensors `load` reads."""
    recorder = _Recorder()
    load(recorder)
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)
            for name in recorder.read}


@pytest.mark.parametrize("family", ["Llama 4", "Gemma 3", "Qwen2.5-VL"])
def test_a_quantized_tower_is_refused(family):
    load = _towers()[family]
    checkpoint = _checkpoint(load)
    load(checkpoint)  # as float: read
    weight = next(n for n in checkpoint if n.endswith("proj.weight") or n.endswith("qkv.weight"))
    last = [n for n in checkpoint if n.endswith("weight")][-1]  # the projector (or merger)
    for name in (weight, last):
        for dtype in (np.int8, ml_dtypes.float8_e4m3fn):
            saved = dict(checkpoint, **{name: checkpoint[name].astype(dtype)})
            with pytest.raises(WeightMismatchError,
                               match=f"{family} vision tower: '{name}' holds quantized"):
                load(saved)
    for companion in ("weight_scale", "weight_packed", "qweight"):
        saved = dict(checkpoint, **{weight.rsplit(".", 1)[0] + "." + companion: np.ones(1)})
        with pytest.raises(WeightMismatchError, match=f"{family} vision tower: .*{companion}"):
            load(saved)
