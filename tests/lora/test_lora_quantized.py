"""LoRA adapters over a quantized base (as vLLM serves them on AWQ/GPTQ/int8 bases): the
base product stays quantized, each token's adapter delta is added in the stacks' dtype.
Reference: transformers+peft on the dequantized base weights, for online int8 and a GPTQ
4-bit checkpoint, base and three adapters mixed in one step.

Tolerance 2e-3, as tests/quantization/test_checkpoint_logits.py: decode rows of a quantized
product run the native kernel on 15-bit activations (quantization/product.py); everything
else, the adapters' deltas included, is float32 on both sides."""

import pytest

from tests.lora.lora_helpers import save_adapters
from tests.lora.test_lora_engine import PROMPTS, _assert_mixed_adapters_match_peft, lora_engine

TOL = 2e-3
NUM_NEW = 8


def _online_int8(root):
    from tests.helpers import save_tiny_llama
    from tests.quantization.test_online import save_dequantized
    from xla_inference.quantization.groups import INT8

    src = save_tiny_llama(root / "m")
    return src, save_dequantized(src, root / "ref", INT8), "int8"


def _gptq_4bit(root):
    from tests.quantization import checkpoints

    base = checkpoints.save_base_model(root / "base")
    ckpt = checkpoints.build("gptq-4bit-sym", root / "gptq", base)
    return ckpt.path, checkpoints.save_dequantized(ckpt, root / "ref"), None


SLOW = pytest.mark.slow  # > 20 s on a loaded 2-core machine


@pytest.mark.parametrize("build, tp", [pytest.param(_online_int8, 1, marks=SLOW), (_gptq_4bit, 1),
                                       pytest.param(_gptq_4bit, 2, marks=SLOW)],
                         ids=["online_int8", "gptq_4bit", "gptq_4bit_tp2"])
def test_adapters_over_quantized_base_match_peft_on_dequantized(tmp_path, build, tp):
    """TP 2 on virtual devices: the stacks split as the quantized weights' values do."""
    from xla_inference.parallel.sharding import build_mesh
    from xla_inference.quantization.packed import PackedWeight

    model_dir, reference_dir, quantization = build(tmp_path)
    adapters = save_adapters(reference_dir, tmp_path / "adapters")
    engine = lora_engine(model_dir, quantization=quantization, mesh=build_mesh(tp))
    if tp > 1:
        q = "model.layers.0.self_attn.q_proj"
        assert tuple(engine.lora.stacks["b"][q].sharding.spec)[:1] == ("model",)
        assert tuple(engine.lora.stacks["a"]["model.layers.0.mlp.down_proj"].sharding.spec)[2:] \
            == ("model",)
    assert isinstance(engine.params.layers[0].attn.wq, PackedWeight)  # the base stays quantized
    assert isinstance(engine.params.layers[1].mlp.w_down, PackedWeight)
    assert len(engine.lora.module_shapes) == 7 * len(engine.params.layers)
    _assert_mixed_adapters_match_peft(engine, reference_dir, adapters, atol=TOL)
    assert max(len(p) for p in PROMPTS) < 16


@pytest.mark.slow
@pytest.mark.vllm
def test_llm_int8_base_with_adapters_and_ngram_matches_peft_greedy(tmp_path):
    """vllm.LLM --quantization int8 --enable-lora with n-gram speculation: base and three
    adapters in one batch (two device slots, so a swap) give transformers+peft's greedy on
    the dequantized weights, drafts are accepted (the verify step reads each token's
    adapter), and nothing compiles after warm-up."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from tests.e2e.engines import metric, num_compilations, shutdown, start_llm
    from tests.lora.lora_helpers import peft_greedy

    model_dir, reference_dir, _ = _online_int8(tmp_path)
    adapters = save_adapters(reference_dir, tmp_path / "adapters")
    requests = [None] + [LoRARequest(name, i, str(path))
                         for i, (name, path) in enumerate(adapters.items(), start=1)]
    prompts = [p * 3 for p in PROMPTS]  # repeating text: n-gram drafts
    llm = start_llm(model_dir, quantization="int8", enable_lora=True, max_loras=2,
                    max_lora_rank=16, max_cpu_loras=3,
                    speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                        "prompt_lookup_max": 3, "prompt_lookup_min": 1})
    try:
        before = num_compilations(llm)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True),
                            lora_request=requests, use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        after = num_compilations(llm)
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
    finally:
        shutdown(llm)
    want = [peft_greedy(reference_dir, None if r is None else adapters[r.lora_name], p, NUM_NEW)
            for p, r in zip(prompts, requests)]
    assert got == want
    assert len({tuple(w) for w in want}) == len(want)  # the adapters change the outputs
    assert accepted > 0
    assert after == before
