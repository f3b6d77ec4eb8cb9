"""Quantized serving at vLLM's config stage (plugin/quantization.py), through vLLM's own
EngineArgs -> VllmConfig path: the methods xla-inference serves pass vLLM's checks with the
default dtype on every host, online int8 is a method vLLM accepts, and every other method,
from the flag or the checkpoint, is refused at start-up by name with what is served.

The checkpoints are a tiny float32 Llama whose config.json gets a quantization_config: the
config stage reads no weights."""

import json
import shutil

import pytest

from tests.helpers import save_tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # builds vLLM configs

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}
FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
W8A8_INT8 = {
    "quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"], "format": "int-quantized",
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                    "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                              "strategy": "token", "dynamic": True}}},
}


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("quant-config") / "llama")


@pytest.fixture
def quantized(plain_dir, tmp_path):
    """quantized(quantization_config, torch_dtype) -> a copy of the tiny checkpoint whose
    config.json carries them."""
    def make(quantization_config, torch_dtype="float16"):
        path = tmp_path / "quantized"
        shutil.copytree(plain_dir, path)
        config = json.loads((path / "config.json").read_text())
        config.update(quantization_config=quantization_config, torch_dtype=torch_dtype,
                      dtype=torch_dtype)
        (path / "config.json").write_text(json.dumps(config))
        return path
    return make


@pytest.fixture(params=[True, False], ids=["avx512_bf16-host", "host-without-bf16"])
def host_bf16(request, monkeypatch):
    """Both kinds of host CPU: with avx512_bf16 dtype="auto" prefers bfloat16, without it
    float32 (plugin/platform.py supported_dtypes)."""
    from xla_inference.plugin import platform

    monkeypatch.setattr(platform, "_jax_runs_on_host", lambda: True)
    monkeypatch.setattr(platform, "_host_has_native_bf16", lambda: request.param)
    return request.param


def _config(model_dir, **args):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model_dir), max_model_len=128, **args).create_engine_config()


def _torch_dtype(name):
    import torch

    return getattr(torch, name)


@pytest.mark.parametrize("quantization_config, vllm_method, loader_method", [
    (AWQ, "auto_awq", "awq"), (GPTQ, "auto_gptq", "gptq"), (FP8, "fp8", "fp8"),
    (W8A8_INT8, "compressed-tensors", "compressed-tensors"),
], ids=["awq", "gptq", "fp8", "compressed-tensors"])
def test_served_checkpoints_pass_with_the_default_dtype(quantized, host_bf16,
                                                        quantization_config, vllm_method,
                                                        loader_method):
    from xla_inference.plugin.quantization import loader_method as to_loader

    config = _config(quantized(quantization_config))
    model = config.model_config
    assert model.quantization == vllm_method and to_loader(model.quantization) == loader_method
    # A float16 checkpoint: bfloat16 where the host computes it natively, else float32 (our
    # CPU activations are float32 either way, runner/build.Precision.for_platform).
    assert model.dtype == _torch_dtype("bfloat16" if host_bf16 else "float32")
    assert config.quant_config is not None


@pytest.mark.parametrize("quantization_config", [AWQ, GPTQ, FP8], ids=["awq", "gptq", "fp8"])
def test_vllm_alone_would_refuse_float32_activations(quantization_config):
    """What accept_float32_activations relaxes: vLLM's own configs for these methods list
    only 16-bit activation dtypes (its GPU kernels'); without the relaxation the tests
    above fail on a host without avx512_bf16."""
    import torch
    from vllm.model_executor.layers.quantization import get_quantization_config

    vllm_config_class = get_quantization_config(quantization_config["quant_method"])
    assert torch.float32 not in vllm_config_class.get_supported_act_dtypes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_kept_for_a_served_checkpoint(quantized, dtype):
    model = _config(quantized(AWQ), dtype=dtype).model_config
    assert model.quantization == "auto_awq" and model.dtype == _torch_dtype(dtype)


@pytest.mark.parametrize("flag", ["int8", "fp8"])
def test_online_quantization_flags_are_accepted(plain_dir, host_bf16, flag):
    from xla_inference.plugin.quantization import loader_method

    config = _config(plain_dir, quantization=flag)
    assert config.model_config.quantization == flag and loader_method(flag) == flag
    assert config.model_config.dtype == _torch_dtype("bfloat16" if host_bf16 else "float32")
    assert config.quant_config is not None


def test_online_int8_accepts_an_explicit_float32(plain_dir):
    config = _config(plain_dir, quantization="int8", dtype="float32")
    assert config.model_config.dtype == _torch_dtype("float32")
    assert config.quant_config.get_name() == "int8"


def test_llm_class_passes_int8_to_the_engine_config(plain_dir):
    """LLM(quantization="int8") builds its config through EngineArgs too: the name reaches
    vLLM's ModelConfig unchanged (the engine itself is not started here)."""
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(plain_dir), quantization="int8", max_model_len=128)
    assert args.create_engine_config().model_config.quantization == "int8"


def test_the_cli_parser_accepts_int8(plain_dir):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(
        ["--model", str(plain_dir), "--quantization", "int8", "--max-model-len", "128"])
    config = AsyncEngineArgs.from_cli_args(parsed).create_engine_config()
    assert config.model_config.quantization == "int8"


@pytest.mark.parametrize("quantization_config, method", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),  # vLLM: unknown
    ({"quant_method": "hqq", "nbits": 4, "group_size": 64}, "hqq"),  # vLLM: unknown
    ({"quant_method": "modelopt", "quant_algo": "FP8"}, "modelopt"),  # vLLM: known
    ({"quant_method": "mxfp4"}, "mxfp4"),
], ids=["bitsandbytes", "hqq", "modelopt", "mxfp4"])
def test_unserved_checkpoint_methods_are_refused_by_name(quantized, quantization_config,
                                                         method):
    with pytest.raises(Exception, match=f"does not support quantization '{method}'") as info:
        _config(quantized(quantization_config, torch_dtype="bfloat16"))
    message = str(info.value)
    assert "from the checkpoint's quantization_config" in message
    assert "awq" in message and "compressed-tensors" in message and "int8" in message


@pytest.mark.parametrize("flag", ["experts_int8", "fp8_per_channel", "bitsandbytes", "moe_wna16"])
def test_unserved_flags_are_refused_by_name(plain_dir, flag):
    with pytest.raises(Exception, match=f"does not support quantization '{flag}'") as info:
        _config(plain_dir, quantization=flag)
    assert "from --quantization" in str(info.value)


def test_a_flag_disagreeing_with_the_checkpoint_is_refused(quantized):
    with pytest.raises(Exception, match="does not match"):
        _config(quantized(AWQ), quantization="int8")


def _ct(weights, input_activations, fmt):
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": {
        "targets": ["Linear"], "format": fmt, "weights": weights,
        "input_activations": input_activations}}}


NVFP4 = _ct({"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
             "group_size": 16, "dynamic": False},
            {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
             "group_size": 16, "dynamic": "local"}, "nvfp4-pack-quantized")
STATIC_INT8 = _ct({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                   "dynamic": False},
                  {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
                   "dynamic": False}, "int-quantized")


@pytest.mark.parametrize("quantization_config, found", [
    (NVFP4, "NVFP4"),
    (STATIC_INT8, "static input activation"),
    ({**AWQ, "version": "gemv"}, "'gemv'"),
    ({**GPTQ, "bits": 3}, "bits=3"),
    ({**FP8, "activation_scheme": "static"}, "activation_scheme 'static'"),
], ids=["ct-nvfp4", "ct-static-int8", "awq-gemv", "gptq-3bit", "fp8-static"])
def test_unreadable_schemes_of_served_methods_are_refused_at_start_up(quantized,
                                                                      quantization_config,
                                                                      found):
    """The method is served but not this scheme: the format readers' own check runs at
    config time, in the front-end, and its message names what was found and what is
    supported."""
    with pytest.raises(Exception, match="not supported") as info:
        _config(quantized(quantization_config, torch_dtype="bfloat16"))
    assert found in str(info.value) and "supported" in str(info.value)


def _served(model_dir, **overrides) -> tuple[int, list[list[int]], object]:
    """(weight bytes the worker loaded, greedy ids for two prompts, vLLM's dtype) of
    vllm.LLM on model_dir (float32 unless overridden)."""
    from tests.e2e.engines import generate_ids, shutdown, start_llm

    llm = start_llm(model_dir, **overrides)
    try:
        dtype = llm.llm_engine.vllm_config.model_config.dtype
        ids = generate_ids(llm, [[5, 9, 17, 33], [7, 8]], max_tokens=4, temperature=0.0,
                           ignore_eos=True)
        return llm.collective_rpc("weight_bytes")[0], ids, dtype
    finally:
        shutdown(llm)


def test_online_int8_reaches_the_loader_through_vllm_llm(plain_dir):
    """LLM(quantization="int8") on a float32 checkpoint: the worker's weights are the
    quantized ones (int8 values and per-channel scales: well under half the float32
    bytes; the embedding stays float)."""
    float_bytes, _, _ = _served(plain_dir)
    int8_bytes, ids, _ = _served(plain_dir, quantization="int8")
    assert int8_bytes < 0.6 * float_bytes, (int8_bytes, float_bytes)
    assert [len(i) for i in ids] == [4, 4]


def test_an_awq_checkpoint_serves_with_the_default_dtype(tmp_path):
    """vllm.LLM on an AWQ checkpoint without --dtype (vLLM alone refuses float32 for AWQ;
    dtype auto is float32 on hosts without avx512_bf16): it starts, holds 4-bit weights
    and generates."""
    from tests.quantization.checkpoints import save_awq, save_base_model

    base = save_base_model(tmp_path / "base")
    awq = save_awq(tmp_path / "awq", base=base).path
    float_bytes, _, _ = _served(base)
    awq_bytes, ids, dtype = _served(awq, dtype="auto")
    assert str(dtype) in ("torch.bfloat16", "torch.float32")
    # 4-bit values and a float32 scale and offset per 32: under a quarter of float32's
    # bytes for the projections; the embedding and lm_head stay in floating point.
    assert awq_bytes < 0.5 * float_bytes, (awq_bytes, float_bytes)
    assert [len(i) for i in ids] == [4, 4]


@pytest.mark.parametrize("checkpoint, quantization", [(None, "fp8"), (AWQ, None)],
                         ids=["online-fp8", "over-an-awq-checkpoint"])
def test_per_layer_online_specs_are_refused(plain_dir, quantized, checkpoint, quantization):
    """--quantization-config (vLLM's per-layer online specs, which vLLM applies with a
    method, online or composed over a checkpoint's) would be ignored by our loader."""
    model_dir = plain_dir if checkpoint is None else quantized(checkpoint)
    with pytest.raises(Exception, match="does not support --quantization-config"):
        _config(model_dir, quantization=quantization,
                quantization_config={"linear": {"weight": "fp8_per_channel_static"}})
