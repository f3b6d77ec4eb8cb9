"""Start-up refusals: features the platform does not serve yet are refused by name, through
vLLM's own EngineArgs -> VllmConfig path (the platform's check_and_update_config)."""

import pytest

from tests.helpers import save_tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # builds vLLM configs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("refusals") / "llama")


def _config(model_dir, **args):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model_dir), max_model_len=128, **args).create_engine_config()


def test_a_plain_model_is_accepted(model_dir):
    assert _config(model_dir).model_config.quantization is None


@pytest.mark.parametrize("args, flag", [
    (dict(quantization="experts_int8"), "quantization 'experts_int8'"),
    (dict(enable_lora=True, runner="pooling", convert="embed"), "on a pooling model"),
    (dict(kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"}),
     "--kv-transfer-config"),
    # Options that change what is computed or returned, which the runner would not read:
    (dict(logprobs_mode="processed_logprobs"), "--logprobs-mode processed_logprobs"),
    (dict(logits_processors=["vllm.v1.sample.logits_processor.builtin:MinPLogitsProcessor"]),
     "--logits-processors"),
    (dict(enable_return_routed_experts=True), "--enable-return-routed-experts"),
    (dict(prefill_context_parallel_size=2), "context parallelism"),
    (dict(kv_cache_dtype="fp8", kv_cache_dtype_skip_layers=["0"]),
     "--kv-cache-dtype-skip-layers"),
    (dict(hf_overrides={"rope_theta": 5000.0}), "--hf-overrides"),
    (dict(watermark_config={"key": 7}), "V2 model runner"),
    (dict(profiler_config={"profiler": "cuda"}), "profiler 'cuda'"),
    # Loaders and load options a native family would not read (it reads the safetensors):
    (dict(load_format="tensorizer"), "--load-format tensorizer with a native JAX family"),
    (dict(load_format="pt"), "--load-format pt"),
    (dict(model_loader_extra_config={"tensorizer_uri": "/tmp/x.tensors"}),
     "--model-loader-extra-config"),
    (dict(ignore_patterns=["*.bin"]), "--ignore-patterns"),
    (dict(disable_sliding_window=True), "--disable-sliding-window"),
    (dict(use_fp64_gumbel=True), "--use-fp64-gumbel"),
    (dict(cpu_offload_gb=1), "--cpu-offload-gb"),
    (dict(device_ids=[0]), "--device-ids"),
    (dict(additional_config={"data_parallel_size": 2}, scheduler_cls="mypkg.sched.Mine"),
     "--scheduler-cls mypkg.sched.Mine with data parallel"),
    (dict(data_parallel_size=2, data_parallel_address="10.1.2.3"),
     "data parallel across nodes"),
    (dict(distributed_executor_backend="external_launcher"), "external_launcher"),
    (dict(additional_config={"data_paralel_size": 2}), "keys ['data_paralel_size']"),
    (dict(profiler_config={"profiler": "torch", "torch_profiler_dir": "/tmp/p",
                           "torch_profiler_activities": ["CPU"]}), "torch_profiler_activities"),
    (dict(ec_transfer_config={"ec_connector": "ECExampleConnector", "ec_role": "ec_consumer",
                              "ec_connector_extra_config": {"shared_storage_path": "/tmp/ec"}}),
     "--ec-transfer-config"),
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                              "prompt_lookup_max": 2, "rejection_sample_method": "block"}),
     "rejection_sample_method 'block'"),
])
def test_unsupported_features_are_refused_by_name(model_dir, args, flag):
    spec = args.get("speculative_config")
    if spec and spec.get("model") == "{model}":
        args = dict(args, speculative_config=dict(spec, model=str(model_dir)))
    with pytest.raises(Exception, match="xla-inference does not support") as info:
        _config(model_dir, **args)
    assert flag in str(info.value)


def test_hf_overrides_are_served_through_vllms_model_class(model_dir):
    """A native family reads config.json (refused above); vLLM's class reads the overridden
    hf_config."""
    config = _config(model_dir, hf_overrides={"rope_theta": 5000.0}, model_impl="vllm")
    assert config.model_config.hf_config.rope_theta == 5000.0


def test_multimodal_options_the_encoders_do_not_read_are_refused(tmp_path):
    """Image or video embeddings as inputs (the encoders read pixels) and video token pruning
    (the encoder would get fewer placeholders than patches) stop the start-up by name."""
    from tests.plugin.test_image_processors import _tiny_qwen2_5_vl

    model = _tiny_qwen2_5_vl(tmp_path / "qwen2_5_vl")
    for args, flag in [(dict(enable_mm_embeds=True), "--enable-mm-embeds"),
                       (dict(video_pruning_rate=0.5), "--video-pruning-rate")]:
        with pytest.raises(Exception, match=f"xla-inference does not support .*{flag}"):
            _config(model, skip_tokenizer_init=True, **args)


def test_a_thinking_token_budget_is_refused_per_request():
    """vLLM's samplers end the reasoning when the budget is spent; a request asking for it
    gets a validation error (a 400 through the server), not an unbounded reasoning."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from xla_inference.plugin.platform import XlaPlatform

    XlaPlatform.validate_request({"type": "token", "prompt_token_ids": [1, 2]},
                                 SamplingParams(max_tokens=4))
    with pytest.raises(VLLMValidationError, match="thinking_token_budget"):
        XlaPlatform.validate_request({"type": "token", "prompt_token_ids": [1, 2]},
                                     SamplingParams(max_tokens=4, thinking_token_budget=8))


def test_a_checkpoint_quantized_by_an_unserved_method_is_refused(tmp_path):
    """(The methods served and refused: tests/plugin/test_quantization_config.py.)"""
    import json

    quantized = save_tiny_llama(tmp_path / "llama")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8"}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="does not support quantization 'modelopt'"):
        _config(quantized)


def test_ngram_speculation_is_accepted_with_synchronous_scheduling(model_dir):
    config = _config(model_dir, speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                    "prompt_lookup_max": 2})
    assert config.speculative_config.method == "ngram"
    assert not config.scheduler_config.async_scheduling


def test_draft_model_speculation_keeps_async_scheduling(model_dir):
    """vLLM turns async scheduling on for draft_model (as for eagle, eagle3 and mtp); the
    platform keeps it (the runner fills vLLM's draft placeholders itself)."""
    config = _config(model_dir, speculative_config={"method": "draft_model",
                                                    "model": str(model_dir),
                                                    "num_speculative_tokens": 2})
    assert config.speculative_config.method == "draft_model"
    assert config.scheduler_config.async_scheduling


def test_lora_with_draft_model_and_eagle3_is_served_and_with_mtp_refused(model_dir, tmp_path):
    """A draft model drafts with the base model, an EAGLE head from the adapted target's
    hidden states, and the verify step applies the adapters (tests/lora/
    test_lora_head_spec_llm.py, test_lora_eagle_llm.py); EAGLE with LoRA and data parallel
    replicas (untested together) and mtp (its DeepSeek-V3 target takes no adapters) are
    refused, naming what is served."""
    from tests.deepseek_mtp_checkpoint import save_tiny_deepseek_mtp
    from tests.eagle3_checkpoint import save_tiny_eagle3, save_tiny_llama_target

    config = _config(model_dir, enable_lora=True,
                     speculative_config={"method": "draft_model", "model": str(model_dir),
                                         "num_speculative_tokens": 2})
    assert config.lora_config is not None and config.speculative_config.method == "draft_model"
    target = save_tiny_llama_target(tmp_path / "target")
    head = save_tiny_eagle3(tmp_path / "head")
    config = _config(target, enable_lora=True,
                     speculative_config={"method": "eagle3", "model": str(head),
                                         "num_speculative_tokens": 2})
    assert config.lora_config is not None and config.speculative_config.method == "eagle3"
    with pytest.raises(Exception, match="eagle3 speculative decoding with LoRA adapters "
                                        r"\(--enable-lora\) and data parallel replicas"):
        _config(target, enable_lora=True, additional_config={"data_parallel_size": 2},
                speculative_config={"method": "eagle3", "model": str(head),
                                    "num_speculative_tokens": 2})
    deepseek = save_tiny_deepseek_mtp(tmp_path / "deepseek")
    with pytest.raises(Exception, match="LoRA adapters .* with speculative decoding method "
                                        "'mtp'.*ngram, draft_model, eagle, eagle3 are served"):
        _config(deepseek, enable_lora=True,
                speculative_config={"method": "mtp", "num_speculative_tokens": 2})


def test_ngram_speculation_with_async_scheduling_is_refused(model_dir):
    """vLLM's own rule (ngram's proposer runs after the step, on the host)."""
    with pytest.raises(Exception, match="async scheduling is only supported"):
        _config(model_dir, async_scheduling=True,
                speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                    "prompt_lookup_max": 2})


def test_draft_model_options_not_served_are_refused_by_name(model_dir):
    with pytest.raises(Exception, match="draft_sample_method 'probabilistic'"):
        _config(model_dir, speculative_config={"method": "draft_model", "model": str(model_dir),
                                               "num_speculative_tokens": 2,
                                               "draft_sample_method": "probabilistic"})


@pytest.mark.parametrize("spec", [
    {"method": "ngram_gpu", "num_speculative_tokens": 2, "prompt_lookup_max": 2},
])
def test_unserved_speculative_methods_are_refused_by_name(model_dir, spec):
    """(mtp is served for DeepSeek-V3 targets; its refusals: tests/e2e/test_llm_deepseek_mtp.py
    and tests/runner/test_deepseek_mtp.py.)"""
    if spec["method"] != "ngram_gpu":
        spec = dict(spec, model=str(model_dir))
    with pytest.raises(Exception, match="does not support speculative decoding method") as info:
        _config(model_dir, speculative_config=spec)
    assert repr(spec["method"]) in str(info.value) and "served: ngram" in str(info.value)


def test_ngram_with_data_parallel_replicas_is_accepted(model_dir):
    """(Served end to end: tests/e2e/test_llm_spec_data_parallel.py.)"""
    config = _config(model_dir, speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                    "prompt_lookup_max": 2},
                     additional_config={"data_parallel_size": 2})
    assert config.additional_config["xla_data_parallel_size"] == 2


_OURS = {"kv_connector": "XlaSharedStorageConnector", "kv_role": "kv_both"}


@pytest.mark.parametrize("module_path", [None, "xla_inference.kv_transfer.shared_storage"])
def test_our_kv_connector_is_accepted(model_dir, module_path):
    config = _config(model_dir, kv_transfer_config=dict(_OURS, kv_connector_module_path=module_path))
    assert config.kv_transfer_config.kv_connector == "XlaSharedStorageConnector"


def test_our_kv_connector_is_accepted_with_data_parallel_and_with_ngram(model_dir):
    """Each data parallel replica runs its own connector (kv_transfer/replicas.py); n-gram
    drafts need only the tokens, so they follow loaded pages."""
    config = _config(model_dir, kv_transfer_config=_OURS,
                     additional_config={"data_parallel_size": 2})
    assert config.scheduler_config.scheduler_cls.endswith("DataParallelScheduler")
    config = _config(model_dir, kv_transfer_config=_OURS,
                     speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                         "prompt_lookup_max": 2})
    assert config.speculative_config.method == "ngram"


@pytest.mark.parametrize("transfer, args, message", [
    (dict(_OURS, kv_connector_module_path="xla_inference.kv_transfer.storage"), {},
     "from module 'xla_inference.kv_transfer.storage'"),
    (dict(_OURS, kv_connector="NixlConnector"), {},
     "KV connector 'NixlConnector' (--kv-transfer-config); it serves XlaSharedStorageConnector"),
    (_OURS, dict(pipeline_parallel_size=2),
     "KV connectors (--kv-transfer-config) with pipeline parallel"),
    (_OURS, dict(pipeline_parallel_size=2, data_parallel_size=2),
     "KV connectors (--kv-transfer-config) with pipeline parallel"),
    (_OURS, dict(speculative_config={"method": "draft_model", "model": "{model}",
                                     "num_speculative_tokens": 2}),
     "with speculative decoding method 'draft_model': its drafter's KV"),
])
def test_kv_connector_settings_we_do_not_serve_are_refused(model_dir, transfer, args, message):
    spec = args.get("speculative_config")
    if spec and spec.get("model") == "{model}":
        args = dict(args, speculative_config=dict(spec, model=str(model_dir)))
    with pytest.raises(Exception, match="xla-inference does not support") as info:
        _config(model_dir, kv_transfer_config=transfer, **args)
    assert message in str(info.value)


def test_pipeline_parallel_is_folded_into_our_mesh(model_dir):
    """vLLM is told pipeline parallel 1 (one worker, world size TP, our uni executor); the
    stages are kept for our mesh's stage axis (parallel/pipeline.py)."""
    config = _config(model_dir, pipeline_parallel_size=2, tensor_parallel_size=2)
    pc = config.parallel_config
    assert (pc.pipeline_parallel_size, pc.world_size, pc.distributed_executor_backend) == (
        1, 2, "uni")
    assert config.additional_config["xla_pipeline_parallel_size"] == 2


def test_pipeline_parallel_refusals(model_dir):
    with pytest.raises(Exception, match="xla-inference does not") as info:
        _config(model_dir, pipeline_parallel_size=2,
                speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                    "prompt_lookup_max": 2})
    assert "with speculative decoding" in str(info.value)


def test_lora_with_pipeline_parallel_is_accepted(model_dir):
    """Each stage's layers add their own layers' adapters (served end to end in
    tests/lora/test_lora_pipeline_llm.py)."""
    config = _config(model_dir, pipeline_parallel_size=2, enable_lora=True)
    assert config.additional_config["xla_pipeline_parallel_size"] == 2
    assert config.lora_config is not None


def test_pipeline_parallel_with_data_parallel_replicas_is_accepted_in_one_process(model_dir):
    """Each replica runs its micro-batches over the stages of its data slice (served end to
    end in tests/e2e/test_llm_pipeline.py); across processes it is refused (test_multihost)."""
    config = _config(model_dir, pipeline_parallel_size=2,
                     additional_config={"data_parallel_size": 2})
    assert config.additional_config["xla_pipeline_parallel_size"] == 2  # our stages, one worker
    assert config.additional_config["xla_data_parallel_size"] == 2


def test_pipeline_parallel_on_a_moe_model_is_refused(tmp_path):
    from tests.helpers import save_tiny_family

    moe = save_tiny_family(tmp_path / "moe", "qwen3_moe")
    with pytest.raises(Exception, match="pipeline parallel .* on a mixture-of-experts model"):
        _config(moe, pipeline_parallel_size=2)


def test_moe_with_data_parallel_replicas_on_the_torch_path_is_refused(tmp_path):
    """Native families split an MoE model's experts across the replicas (served end to
    end: tests/e2e/test_llm_moe_data_parallel.py); vLLM's PyTorch class does not."""
    from tests.helpers import save_tiny_family

    moe = save_tiny_family(tmp_path / "moe", "qwen3_moe")
    config = _config(moe, additional_config={"data_parallel_size": 2})
    assert config.additional_config["xla_data_parallel_size"] == 2
    with pytest.raises(Exception, match="on its native JAX text families only"):
        _config(moe, model_impl="vllm", additional_config={"data_parallel_size": 2})
