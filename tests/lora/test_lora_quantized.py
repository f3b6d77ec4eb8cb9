"""LoRA adapters over a quantized base (as vLLM serves them on AWQ/GPTQ/int8 bases): the
base product stays quantized, each token's adapter delta is added in the stacks' dtype.
Reference: transformers+peft on the dequantized base weights, for a GPTQ 4-bit checkpoint
(also at TP 2), base and three adapters mixed in one step (online int8, and through
vllm.LLM: tests/lora/test_lora_moe.py).

Tolerance 2e-3, as tests/quantization/test_checkpoint_logits.py: decode rows of a quantized
product run the native kernel on 15-bit activations (quantization/product.py); everything
else, the adapters' deltas included, is float32 on both sides."""

import pytest

from tests.lora.lora_helpers import save_adapters
from tests.lora.test_lora_engine import PROMPTS, _assert_mixed_adapters_match_peft, lora_engine

TOL = 2e-3


def _gptq_4bit(root):
    from tests.quantization import checkpoints

    base = checkpoints.save_base_model(root / "base")
    ckpt = checkpoints.build("gptq-4bit-sym", root / "gptq", base)
    return ckpt.path, checkpoints.save_dequantized(ckpt, root / "ref"), None


SLOW = pytest.mark.slow  # > 20 s on a loaded 2-core machine


# Online int8 (and through vllm.LLM): tests/lora/test_lora_moe.py, on Qwen3-MoE.
@pytest.mark.parametrize("build, tp", [(_gptq_4bit, 1), pytest.param(_gptq_4bit, 2, marks=SLOW)],
                         ids=["gptq_4bit", "gptq_4bit_tp2"])
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
    # every layer's seven projections, and the embedding and LM head
    assert len(engine.lora.module_shapes) == 7 * len(engine.params.layers) + 2
    _assert_mixed_adapters_match_peft(engine, reference_dir, adapters, atol=TOL)
    assert max(len(p) for p in PROMPTS) < 16
