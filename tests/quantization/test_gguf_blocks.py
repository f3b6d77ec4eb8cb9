"""GGML blocks -> GroupQuant (quantization/formats/gguf_blocks.py) against the gguf package's
own dequantizer, bit for bit in float32: on blocks the package quantizes, on random valid
blocks of the types it cannot quantize, on the real SmolLM2 and Gemma 3 270M files, and
through `HFTensors.quantized_weight` against the float path (`HFTensors[name]`)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from xla_inference.quantization.formats.gguf_blocks import SUPPORTED_TYPES, group_quant_from_blocks
from xla_inference.quantization.groups import INT4, INT8

T = gguf.GGMLQuantizationType

# type -> (kind, group size, smallest and largest value)
EXPECTED = {
    T.Q4_0: (INT4, 32, 0, 15), T.Q4_1: (INT4, 32, 0, 15), T.Q5_0: (INT8, 32, -16, 15),
    T.Q5_1: (INT8, 32, 0, 31), T.Q8_0: (INT8, 32, -128, 127), T.Q2_K: (INT4, 16, 0, 3),
    T.Q3_K: (INT8, 16, -4, 3), T.Q4_K: (INT4, 32, 0, 15), T.Q5_K: (INT8, 32, 0, 31),
    T.Q6_K: (INT8, 16, -32, 31), T.Q8_K: (INT8, 256, -128, 127),
}  # fmt: skip
QUANTIZABLE = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]  # gguf.quants.quantize does these
# Types the package cannot quantize get random bytes, except their floating-point fields
# (byte offset within the block -> float16 or float32), set to finite values so that
# the comparison is between numbers (ggml-common.h's block structs).
FLOAT_FIELDS = {
    T.Q2_K: {80: np.float16, 82: np.float16}, T.Q3_K: {108: np.float16},
    T.Q4_K: {0: np.float16, 2: np.float16}, T.Q5_K: {0: np.float16, 2: np.float16},
    T.Q6_K: {208: np.float16}, T.Q8_K: {0: np.float32},
}  # fmt: skip


def test_every_supported_type_is_tested():
    assert set(EXPECTED) == SUPPORTED_TYPES == set(QUANTIZABLE) | set(FLOAT_FIELDS)


def random_weight(shape, seed):
    rng = np.random.default_rng(seed)
    # Rows of very different magnitude, some all negative or all positive, exercise scales
    # and offsets of both signs.
    scale = np.exp(rng.normal(scale=2.0, size=(shape[0], 1)))
    shift = rng.normal(size=(shape[0], 1)) * (rng.random((shape[0], 1)) < 0.3) * 4
    return ((rng.normal(size=shape) + shift) * scale).astype(np.float32)


def random_blocks(qtype, rows, cols, seed):
    """Random bytes in `qtype`'s block layout with finite, varied floating-point fields."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)
    for start, dtype in FLOAT_FIELDS[qtype].items():
        values = (rng.normal(size=len(blocks)) * np.exp(rng.normal(scale=3, size=len(blocks))))
        width = np.dtype(dtype).itemsize
        blocks[:, start:start + width] = values.astype(dtype).view(np.uint8).reshape(-1, width)
    return blocks.reshape(rows, -1)


def blocks_for(qtype, rows, cols, seed):
    if qtype in QUANTIZABLE:
        return quantize(random_weight((rows, cols), seed), qtype)
    return random_blocks(qtype, rows, cols, seed)


def reference(data, qtype):
    """The gguf package's float32 dequantization; Q8_K, which it does not dequantize (ggml
    uses it only for activations), from its layout: float32 d, then 256 int8."""
    if qtype != T.Q8_K:
        return dequantize(data, qtype)
    blocks = data.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
    d = blocks[:, :4].copy().view(np.float32)
    return (blocks[:, 4:260].view(np.int8).astype(np.float32) * d).reshape(data.shape[0], -1)


@pytest.mark.parametrize("qtype", sorted(EXPECTED), ids=lambda t: t.name)
@pytest.mark.parametrize("rows, cols", [(5, 256), (17, 768)])
def test_dequantized_group_quant_equals_gguf_dequantize(qtype, rows, cols):
    data = blocks_for(qtype, rows, cols, seed=rows + int(qtype))
    weight = group_quant_from_blocks(qtype, data, (rows, cols), "w")
    expected = reference(data, qtype)
    assert np.isfinite(expected).all()
    np.testing.assert_array_equal(weight.dequantize(np.float32), expected)
    # float64 is the exact formula: within float32 rounding of the package's result.
    np.testing.assert_allclose(weight.dequantize(np.float64), expected, rtol=2 ** -23, atol=0)
    kind, group_size, low, high = EXPECTED[qtype]
    assert (weight.kind, weight.group_size, weight.shape) == (kind, group_size, (rows, cols))
    assert weight.name == "w"
    assert weight.scales.dtype == np.float32 and weight.scales.shape == (rows, cols // group_size)
    assert low <= weight.values.min() and weight.values.max() <= high


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0, T.Q8_0, T.Q3_K, T.Q6_K, T.Q8_K],
                         ids=lambda t: t.name)
def test_symmetric_types_have_no_offsets(qtype):
    weight = group_quant_from_blocks(qtype, blocks_for(qtype, 2, 256, 0), (2, 256), "w")
    assert (weight.offsets is None) == (qtype != T.Q4_0)  # Q4_0's -8 d is its offset


def test_signed_ranges_reach_both_ends():
    """Q5_0 keeps q - 16 in int8: a block spanning [-1, 1] uses -16 and 15 (d = 1/16)."""
    w = np.tile(np.linspace(-1, 1, 32, dtype=np.float32), (4, 8))
    weight = group_quant_from_blocks(T.Q5_0, quantize(w, T.Q5_0), w.shape, "w")
    assert (int(weight.values.min()), int(weight.values.max())) == (-16, 15)
    np.testing.assert_array_equal(weight.scales, np.float32(1 / 16))


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types_are_not_quantized(qtype):
    data = np.zeros((2, 32 * gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8)
    assert group_quant_from_blocks(qtype, data, (2, 32), "w") is None


def test_unsupported_type_names_tensor_and_supported_types():
    data = np.zeros((2, 18), np.uint8)
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q\.weight'.*IQ4_NL.*Q4_K.*Q6_K"):
        group_quant_from_blocks(T.IQ4_NL, data, (2, 32), "blk.0.attn_q.weight")


@pytest.mark.parametrize("shape, data_shape", [((2, 48), (2, 18)), ((2, 64), (2, 18)),
                                               ((3, 32), (2, 18))])
def test_bytes_that_do_not_fit_the_shape_are_refused(shape, data_shape):
    with pytest.raises(ValueError, match="'w'"):
        group_quant_from_blocks(T.Q4_0, np.zeros(data_shape, np.uint8), shape, "w")


# --------------------------------------------------------------------------- real files


def gguf_tensors(path_function):
    from xla_inference.loading.gguf import read_gguf

    # ./dev setup installs both model packages: a missing file is a failure, not a skip.
    return read_gguf(path_function())


@pytest.fixture(scope="module")
def smollm2():
    """(metadata, lazy tensors) of the default model's Q4_1 GGUF (read once: ~3 s)."""
    from xla_inference.loading.default_model import default_gguf_path

    return gguf_tensors(default_gguf_path)


def check_raw_tensor(tensors, name):
    raw = tensors.raw(name)
    weight = group_quant_from_blocks(raw.ggml_type, raw.data, raw.shape, name)
    np.testing.assert_array_equal(weight.dequantize(np.float32), dequantize(raw.data, raw.ggml_type))
    return raw.ggml_type


def test_smollm2_tensors_equal_gguf_dequantize(smollm2):
    _, tensors = smollm2
    names = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight",
             "blk.29.attn_v.weight"]
    assert {check_raw_tensor(tensors, n) for n in names} == {T.Q8_0, T.Q4_1}


@pytest.mark.slow  # reading the file's metadata alone takes ~15 s (a 262k-token vocabulary)
def test_gemma3_270m_tensors_equal_gguf_dequantize():
    from xla_inference.loading.default_model import gemma3_270m_gguf_path

    metadata, tensors = gguf_tensors(gemma3_270m_gguf_path)
    first_of_type = {}
    for name in tensors:
        qtype = tensors.raw(name).ggml_type
        if qtype in SUPPORTED_TYPES and name != "token_embd.weight":
            first_of_type.setdefault(qtype, name)
    assert set(first_of_type) == {T.Q5_0, T.Q8_0, T.Q4_K, T.Q6_K}
    for name in first_of_type.values():
        check_raw_tensor(tensors, name)
    embed = tensors.raw("token_embd.weight").take_rows(np.arange(0, 262144, 97))  # Q8_0
    weight = group_quant_from_blocks(embed.ggml_type, embed.data, embed.shape, embed.name)
    np.testing.assert_array_equal(weight.dequantize(np.float32), dequantize(embed.data, embed.ggml_type))
    check_gemma3_quantized_weights(metadata, tensors, first_of_type)


def check_gemma3_quantized_weights(metadata, tensors, first_of_type):
    """Through Gemma 3's HF mapping: each type's first tensor equals the float path; the
    norms (stored + 1, given back as stored - 1) have no quantized form."""
    from xla_inference.loading.gguf_gemma3 import gemma3_hf_config_from_gguf, gemma3_hf_state_dict_from_gguf

    hf = gemma3_hf_state_dict_from_gguf(tensors, gemma3_hf_config_from_gguf(metadata, tensors))
    hf_of = {hf.recipe(name).gguf_name: name for name in hf}
    for gguf_name in first_of_type.values():
        name = hf_of[gguf_name]
        np.testing.assert_array_equal(hf.quantized_weight(name).dequantize(np.float32), hf[name],
                                      err_msg=name)
    assert hf.quantized_weight("model.layers.0.self_attn.q_norm.weight") is None


def test_smollm2_quantized_weights_equal_the_float_path(smollm2):
    """Through the HF mapping: q/k rows in HF (rope) order, as `HFTensors[name]` has them."""
    from xla_inference.loading.gguf import llama_hf_config_from_gguf, llama_hf_state_dict_from_gguf

    metadata, tensors = smollm2
    hf = llama_hf_state_dict_from_gguf(tensors, llama_hf_config_from_gguf(metadata, tensors))
    layer = "model.layers.0."
    for name in [layer + "self_attn.q_proj.weight", layer + "self_attn.k_proj.weight",
                 layer + "self_attn.o_proj.weight", layer + "mlp.gate_proj.weight",
                 layer + "mlp.down_proj.weight", "model.embed_tokens.weight"]:
        weight = hf.quantized_weight(name)
        np.testing.assert_array_equal(weight.dequantize(np.float32), hf[name], err_msg=name)
    assert hf.recipe(layer + "self_attn.q_proj.weight").rows is not None  # the permuted case
    assert hf.quantized_weight(layer + "input_layernorm.weight") is None  # F32


def test_quantized_weight_is_none_without_a_quantized_form():
    from xla_inference.loading.gguf import GGUFTensors, HFTensors, Recipe

    class FakeReader:  # what GGUFTensors reads of gguf.GGUFReader: its tensor infos
        def __init__(self, tensors):
            self.tensors = tensors

    class Info:
        def __init__(self, name, qtype, data, shape):
            self.name, self.tensor_type, self.data, self.shape = name, qtype, data, shape

    q4 = quantize(random_weight((4, 64), 0), T.Q4_0)
    source = GGUFTensors(FakeReader([
        Info("q4", T.Q4_0, q4, [64, 4]),
        Info("f32", T.F32, np.ones((4, 64), np.float32), [64, 4]),
        Info("iq4", T.IQ4_NL, np.zeros((4, 36), np.uint8), [64, 4]),
    ]))
    hf = HFTensors(source, {"plain": Recipe("q4"), "rows": Recipe("q4", rows=np.array([2, 0, 3, 1])),
                            "norm": Recipe("q4", subtract=1.0), "float": Recipe("f32"),
                            "iq4": Recipe("iq4")})
    np.testing.assert_array_equal(hf.quantized_weight("plain").dequantize(np.float32), hf["plain"])
    np.testing.assert_array_equal(hf.quantized_weight("rows").dequantize(np.float32), hf["rows"])
    np.testing.assert_array_equal(hf["rows"], hf["plain"][[2, 0, 3, 1]])
    assert [hf.quantized_weight(n) for n in ("norm", "float", "iq4")] == [None, None, None]
    in_memory = HFTensors({"q4": hf["plain"]}, {"plain": Recipe("q4")})
    assert in_memory.quantized_weight("plain") is None
