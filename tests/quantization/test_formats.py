"""The safetensors format readers (quantization/formats/) against tiny checkpoints quantized
by compressed_tensors itself or packed by our own numpy (tests/quantization/checkpoints.py):
every quantized module's GroupQuant dequantizes to the writer's reference (compressed_tensors'
decompression, or (q - z) * s from the integers we packed) to float32 rounding, modules left
unquantized read as None, and what we cannot serve is refused naming what was found."""

import copy
import json

import numpy as np
import pytest

from tests.quantization import checkpoints
from xla_inference.quantization.formats import SUPPORTED_METHODS, reader_for, refusal
from xla_inference.quantization.groups import (
    FLOAT_ACTIVATIONS, FP8, INT4, INT8, INT8_ACTIVATIONS)

# name -> (kind, activations, group size of q_proj [128 out, 128 in])
EXPECTED = {
    "ct-w8a8": (INT8, INT8_ACTIVATIONS, 128),
    "ct-w8a8-tensor": (INT8, INT8_ACTIVATIONS, 128),
    "ct-fp8-channel": (FP8, FLOAT_ACTIVATIONS, 128),
    "ct-fp8-tensor": (FP8, FLOAT_ACTIVATIONS, 128),
    "ct-fp8-block": (FP8, FLOAT_ACTIVATIONS, 128),
    "ct-fp8-weight-only": (FP8, FLOAT_ACTIVATIONS, 128),
    "ct-w4a16": (INT4, FLOAT_ACTIVATIONS, 32),
    "ct-w4a16-asym": (INT4, FLOAT_ACTIVATIONS, 32),
    "ct-w4a16-channel": (INT4, FLOAT_ACTIVATIONS, 128),
    "ct-w8a16": (INT8, FLOAT_ACTIVATIONS, 64),
    "ct-w8a16-asym": (INT8, FLOAT_ACTIVATIONS, 64),
    "awq-g32": (INT4, FLOAT_ACTIVATIONS, 32),
    "awq-g128": (INT4, FLOAT_ACTIVATIONS, 128),
    "gptq-4bit-sym": (INT4, FLOAT_ACTIVATIONS, 32),
    "gptq-4bit-asym": (INT4, FLOAT_ACTIVATIONS, 32),
    "gptq-4bit-asym-v2": (INT4, FLOAT_ACTIVATIONS, 32),
    "gptq-4bit-channel": (INT4, FLOAT_ACTIVATIONS, 128),
    "gptq-4bit-desc-act": (INT4, FLOAT_ACTIVATIONS, 32),
    "gptq-8bit-sym": (INT8, FLOAT_ACTIVATIONS, 64),
    "gptq-8bit-asym": (INT8, FLOAT_ACTIVATIONS, 64),
}
Q_PROJ = "model.layers.0.self_attn.q_proj."


def _open(quantized_checkpoint, name):
    ck = quantized_checkpoint(name)
    config = json.loads((ck.path / "config.json").read_text())  # as written to disk
    return ck, config["quantization_config"], checkpoints.read_tensors(ck.path)


def test_every_checkpoint_has_an_expectation():
    assert set(EXPECTED) == set(checkpoints.CHECKPOINTS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reads_what_the_writer_wrote(quantized_checkpoint, name):
    ck, quant_config, tensors = _open(quantized_checkpoint, name)
    reader = reader_for(quant_config)
    assert len(ck.reference) == 14
    for prefix, reference in ck.reference.items():
        gq = reader.read_weight(tensors, prefix, reference.shape)
        assert gq is not None, prefix
        assert gq.shape == reference.shape
        # float32 rounding: of each value (references dequantized in float32), and of the
        # offsets -z*s (an absolute error of the weight's own magnitude)
        np.testing.assert_allclose(gq.dequantize(), reference, rtol=2e-7,
                                   atol=2e-7 * np.abs(reference).max(), err_msg=prefix)
        again = reader.read_weight(tensors, prefix, None)  # shape from the tensors
        np.testing.assert_array_equal(again.dequantize(), gq.dequantize())
    kind, activations, group = EXPECTED[name]
    gq = reader.read_weight(tensors, Q_PROJ, ck.shape(Q_PROJ))
    assert (gq.kind, gq.activations, gq.group_size) == (kind, activations, group)
    for prefix in ck.unquantized:
        assert reader.read_weight(tensors, prefix, (128, 128)) is None
    for not_linear in ("model.embed_tokens.", "model.norm.", "model.layers.0.input_layernorm."):
        assert reader.read_weight(tensors, not_linear, None) is None  # the loader asks
    assert not reader.owns("lm_head.weight")
    assert any(reader.owns(t) for t in tensors if t.startswith(Q_PROJ))


def test_fp8_block_scales_cover_partial_blocks(quantized_checkpoint):
    """k_proj is [64, 128]: one 128 x 128 block holding only 64 rows; gate_proj [256, 128]:
    two block rows (distinct scales), down_proj [128, 256]: two block columns."""
    ck, quant_config, tensors = _open(quantized_checkpoint, "ct-fp8-block")
    reader = reader_for(quant_config)
    for proj, blocks in (("self_attn.k_proj", (1, 1)), ("mlp.gate_proj", (2, 1)),
                         ("mlp.down_proj", (1, 2))):
        prefix = f"model.layers.1.{proj}."
        assert tensors[prefix + "weight_scale"].shape == blocks
        gq = reader.read_weight(tensors, prefix, ck.shape(prefix))
        assert len(np.unique(gq.scales)) == blocks[0] * blocks[1]


# ----- refusals -----------------------------------------------------------------------------

def _ct_config(weights, inputs=None, fmt="float-quantized", **extra):
    group = {"targets": ["Linear"], "weights": weights, "input_activations": inputs}
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
            "config_groups": {"group_0": group}, "quantization_status": "compressed", **extra}


FP8_W = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
         "dynamic": False}
INT8_W = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True,
          "dynamic": False}
TOKEN_INT8 = {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True,
              "dynamic": True}
INT4_W = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
          "symmetric": True, "dynamic": False}
FP4_W = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
         "symmetric": True, "dynamic": False}

REFUSED = {
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    "gguf": ({"quant_method": "gguf"}, "'gguf'"),
    "hqq": ({"quant_method": "hqq", "nbits": 4}, "'hqq'"),
    "mxfp4": ({"quant_method": "mxfp4"}, "'mxfp4'"),
    "modelopt": ({"quant_method": "modelopt", "quant_algo": "FP8"}, "'modelopt'"),
    "no quant_method": ({"bits": 4}, "without quant_method"),
    "ct static fp8 input": (_ct_config(FP8_W, {"num_bits": 8, "type": "float",
                                               "strategy": "tensor", "dynamic": False}),
                            "static input activation scales (input_scale)"),
    "ct static int8 input": (_ct_config(INT8_W, {**TOKEN_INT8, "strategy": "tensor",
                                                 "dynamic": False}, "int-quantized"),
                             "static input activation scales"),
    "ct asymmetric input": (_ct_config(INT8_W, {**TOKEN_INT8, "symmetric": False},
                                       "int-quantized"), "asymmetric input activations"),
    "ct asymmetric int8 weights": (_ct_config({**INT8_W, "symmetric": False}, TOKEN_INT8,
                                              "int-quantized"), "int 8-bit channel asymmetric"),
    "ct actorder group": (_ct_config({**INT4_W, "actorder": "group"}, None, "pack-quantized"),
                          "actorder='group'"),
    "ct nvfp4": (_ct_config(FP4_W, {**FP4_W, "dynamic": "local"}, "nvfp4-pack-quantized"),
                 "NVFP4"),
    "ct nvfp4a16": (_ct_config(FP4_W, None, "nvfp4-pack-quantized"), "NVFP4"),
    "ct mxfp4": (_ct_config({**FP4_W, "strategy": "group", "group_size": 32}, None,
                            "mxfp4-pack-quantized"), "MXFP4"),
    "ct w4a8": (_ct_config(INT4_W, TOKEN_INT8, "int-quantized"), "W4A8"),
    "ct 3-bit": (_ct_config({**INT4_W, "num_bits": 3}, None, "pack-quantized"),
                 "int 3-bit group"),
    "ct int8 weight-only naive": (_ct_config(INT8_W, None, "naive-quantized"),
                                  "int 8-bit channel"),
    "ct output activations": (
        {**_ct_config(FP8_W), "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": FP8_W, "output_activations": FP8_W}}},
        "output activation"),
    "ct 2:4 sparsity": (_ct_config(FP8_W, sparsity_config={
        "format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": ["Linear"]}),
        "2:4"),
    "ct kv cache per head": (_ct_config(FP8_W, kv_cache_scheme={
        "num_bits": 8, "type": "float", "strategy": "attn_head", "symmetric": True,
        "dynamic": False}), "per-head scales"),
    "ct kv cache int8": (_ct_config(FP8_W, kv_cache_scheme={
        "num_bits": 8, "type": "int", "strategy": "tensor", "symmetric": True,
        "dynamic": False}), "'type': 'int'"),
    "ct attention": ({**_ct_config(FP8_W), "config_groups": {"attn": {
        "targets": ["LlamaAttention"], "input_activations": FP8_W}}}, "attention"),
    "ct transform": (_ct_config(FP8_W, transform_config={"config_groups": {"u": {}}}),
                     "transform_config"),
    "ct frozen": (_ct_config(FP8_W, quantization_status="frozen"), "'frozen'"),
    "awq gemv": ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                  "version": "gemv"}, "version 'gemv'"),
    "awq symmetric": ({"quant_method": "awq", "bits": 4, "group_size": 128,
                       "zero_point": False, "version": "gemm"}, "zero_point=false"),
    "awq 8-bit": ({"quant_method": "awq", "bits": 8, "group_size": 128, "zero_point": True},
                  "bits=8"),
    "gptq 3-bit": ({"quant_method": "gptq", "bits": 3, "group_size": 128, "sym": True,
                    "desc_act": False}, "bits=3"),
    "gptq marlin format": ({"quant_method": "gptq", "bits": 4, "group_size": 128,
                            "sym": True, "desc_act": False, "checkpoint_format": "marlin"},
                           "checkpoint_format 'marlin'"),
    "gptq dynamic 2-bit": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True,
                            "desc_act": False, "dynamic": {r"+:.*mlp.*": {"bits": 2}}},
                           "bits=2 (dynamic rule"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refuses_naming_what_was_found(case):
    config, found = REFUSED[case]
    with pytest.raises(ValueError) as e:
        reader_for(copy.deepcopy(config))
    message = str(e.value)
    assert found in message, message
    assert "supported" in message


def test_refusal_lists_the_supported_methods():
    message = refusal("hqq")
    assert "'hqq'" in message
    for method in SUPPORTED_METHODS:
        assert method in message


def test_quantization_flag_must_agree(quantized_checkpoint):
    awq = quantized_checkpoint("awq-g32").quantization_config
    for flag in ("awq", "awq_marlin", "auto_awq", "marlin"):
        assert reader_for(awq, flag).method == "awq"
    with pytest.raises(ValueError, match="disagrees"):
        reader_for(awq, "gptq")
    assert reader_for(None, None) is None
    with pytest.raises(ValueError, match="no quantization_config"):
        reader_for(None, "awq")


# ----- per-module errors and skips ----------------------------------------------------------

BAD_SHAPES = {
    "ct-w8a8": "weight_scale", "ct-fp8-block": "weight_scale", "ct-w4a16": "weight_scale",
    "ct-w4a16-asym": "weight_zero_point", "ct-w8a16": "weight_packed", "awq-g32": "scales",
    "awq-g128": "qzeros", "gptq-4bit-sym": "scales", "gptq-4bit-asym": "qzeros",
    "gptq-8bit-sym": "qweight",
}


@pytest.mark.parametrize("name", sorted(BAD_SHAPES))
def test_mismatched_tensor_shape_names_the_tensor(quantized_checkpoint, name):
    ck, quant_config, tensors = _open(quantized_checkpoint, name)
    tensor = Q_PROJ + BAD_SHAPES[name]
    tensors[tensor] = np.concatenate([tensors[tensor]] * 2, axis=0)
    with pytest.raises(ValueError, match=tensor.replace(".", r"\.")):
        reader_for(quant_config).read_weight(tensors, Q_PROJ, ck.shape(Q_PROJ))


def test_weight_shape_that_disagrees_with_the_model(quantized_checkpoint):
    ck, quant_config, tensors = _open(quantized_checkpoint, "ct-w4a16")
    with pytest.raises(ValueError, match=r"weight_shape"):
        reader_for(quant_config).read_weight(tensors, Q_PROJ, (128, 96))


def test_missing_tensor_is_named(quantized_checkpoint):
    ck, quant_config, tensors = _open(quantized_checkpoint, "ct-fp8-channel")
    del tensors[Q_PROJ + "weight_scale"]
    with pytest.raises(ValueError, match=r"q_proj\.weight_scale' is missing"):
        reader_for(quant_config).read_weight(tensors, Q_PROJ, ck.shape(Q_PROJ))


def test_gptq_activation_reordering_is_refused(quantized_checkpoint):
    ck, quant_config, tensors = _open(quantized_checkpoint, "gptq-4bit-desc-act")
    assert quant_config["desc_act"]  # trivial g_idx everywhere: read (above); now permute one
    tensors[Q_PROJ + "g_idx"] = tensors[Q_PROJ + "g_idx"][::-1].copy()
    with pytest.raises(ValueError, match="activation reordering"):
        reader_for(quant_config).read_weight(tensors, Q_PROJ, ck.shape(Q_PROJ))


def test_modules_left_unquantized_by_the_config(quantized_checkpoint):
    """AWQ's modules_to_not_convert, GPTQModel's negative dynamic rules and
    modules_in_block_to_quantize, compressed-tensors' ignore regexes: None for those."""
    down = "model.layers.1.mlp.down_proj."
    cases = {
        "awq-g32": {"modules_to_not_convert": ["mlp"]},
        "gptq-4bit-sym": {"dynamic": {r"-:.*\.mlp\..*": {}}},
        "gptq-8bit-sym": {"modules_in_block_to_quantize": [["self_attn.q_proj"],
                                                           ["self_attn.k_proj"]]},
        "ct-w8a8": {"ignore": ["lm_head", r"re:.*mlp\..*_proj$"]},
    }
    for name, change in cases.items():
        ck, quant_config, tensors = _open(quantized_checkpoint, name)
        reader = reader_for({**quant_config, **change})
        assert reader.read_weight(tensors, down, ck.shape(down)) is None, name
        assert reader.read_weight(tensors, Q_PROJ, ck.shape(Q_PROJ)) is not None, name


def test_gptq_dynamic_override_changes_a_module(quantized_checkpoint):
    """A positive rule changing the group size: the layer it matches is read with it (and
    its scales, written for groups of 32, no longer fit)."""
    ck, quant_config, tensors = _open(quantized_checkpoint, "gptq-4bit-sym")
    reader = reader_for({**quant_config, "dynamic": {r"+:.*layers\.1\..*": {"group_size": 64}}})
    assert reader.read_weight(tensors, Q_PROJ, ck.shape(Q_PROJ)).group_size == 32
    other = "model.layers.1.self_attn.q_proj."
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj\.scales"):
        reader.read_weight(tensors, other, ck.shape(other))


def test_ct_targets_select_modules(quantized_checkpoint):
    """Targets by regex: modules no group targets are unquantized (None)."""
    ck, quant_config, tensors = _open(quantized_checkpoint, "ct-w4a16")
    config = copy.deepcopy(quant_config)
    config["config_groups"]["group_0"]["targets"] = [r"re:.*self_attn\.(q|k)_proj$"]
    reader = reader_for(config)
    assert reader.read_weight(tensors, Q_PROJ, ck.shape(Q_PROJ)) is not None
    v_proj = "model.layers.0.self_attn.v_proj."
    assert reader.read_weight(tensors, v_proj, ck.shape(v_proj)) is None


def test_dequantized_checkpoint_holds_the_reference(quantized_checkpoint, dequantized_checkpoint):
    """The float checkpoint end-to-end tests compare against: reference weights where the
    quantized one has quantized modules, the base's tensors elsewhere."""
    ck = quantized_checkpoint("awq-g32")
    tensors = checkpoints.read_tensors(dequantized_checkpoint("awq-g32"))
    base = checkpoints.read_tensors(ck.base)
    assert set(tensors) == set(base)
    for prefix, reference in ck.reference.items():
        np.testing.assert_array_equal(tensors[prefix + "weight"], reference.astype(np.float32))
    np.testing.assert_array_equal(tensors["lm_head.weight"], base["lm_head.weight"])
    assert "quantization_config" not in json.loads(
        (dequantized_checkpoint("awq-g32") / "config.json").read_text())


@pytest.mark.slow
@pytest.mark.vllm
def test_our_packers_match_vllms():
    """The test checkpoints' AWQ and GPTQ packing equals vLLM's own reference packers (its
    kernel tests' awq_pack / gptq_pack / pack_cols) on the same integers."""
    import torch
    from vllm.model_executor.layers.quantization.utils import quant_utils

    rng = np.random.default_rng(0)
    for bits in (4, 8):
        q = rng.integers(0, 1 << bits, size=(64, 96))  # [in, out]
        theirs = quant_utils.gptq_pack(torch.from_numpy(q), bits, 64, 96).numpy()
        np.testing.assert_array_equal(checkpoints.gptq_pack_rows(q, bits), theirs)
        theirs = quant_utils.pack_cols(torch.from_numpy(q), bits, 64, 96).numpy()
        np.testing.assert_array_equal(checkpoints.gptq_pack_columns(q, bits), theirs)
    q = rng.integers(0, 16, size=(64, 96))
    theirs = quant_utils.awq_pack(torch.from_numpy(q), 4, 64, 96).numpy()
    np.testing.assert_array_equal(checkpoints.awq_pack(q), theirs)


def test_int8_token_inputs_rounds_each_row():
    """The W8A8 reference hook: each input row becomes round(x / s) * s, s = max|x| / 127."""
    import torch

    model = torch.nn.Sequential(torch.nn.Identity())
    hooks = checkpoints.int8_token_inputs(model, ["0."])
    x = np.random.default_rng(0).normal(size=(3, 40)).astype(np.float32)
    x[1] = 0.0  # an all-zero row stays zero
    got = model(torch.from_numpy(x)).numpy()
    for h in hooks:
        h.remove()
    s = np.abs(x).max(axis=1, keepdims=True).astype(np.float64) / 127
    s[s == 0] = 1
    np.testing.assert_allclose(got, np.rint(x / s) * s, rtol=1e-6, atol=1e-7)
    assert len(np.unique(np.round(got[0] / s[0]))) > 20
