"""LoRA adapters on the MoE families (Qwen3-MoE, Mixtral): every layer's attention
projections (and a dense MLP layer's gate/up/down) take each token's adapter, within 2e-4
of transformers+peft for base and three adapters of different ranks mixed in one step, two
of them on every expert too (peft's target_parameters on the fused gate_up_proj and
down_proj); other target_parameters are refused with the field named."""

import json

import numpy as np
import pytest

from tests.helpers import save_tiny_family
from tests.lora.lora_helpers import peft_logits, save_adapter
from tests.lora.test_lora_engine import PROMPTS, _assert_mixed_adapters_match_peft, lora_engine
from xla_inference.lora.peft import LoraError, load_adapter

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# peft moves gate/up/down of a fused-experts model (transformers >= 5's Qwen3-MoE) to
# target_parameters (the experts' gate_up_proj, at twice the rank, and down_proj); Mixtral's
# experts are named as parameters.
EXPERTS = {"qwen3_moe": dict(target_modules=["q_proj", "v_proj", "gate_proj", "up_proj",
                                             "down_proj"]),
           "mixtral": dict(target_modules=["q_proj", "v_proj"],
                           target_parameters=["gate_up_proj", "down_proj"])}


def moe_adapters(family):
    return [("m4", dict(r=4, lora_alpha=8, target_modules=ATTENTION)),
            ("e4", dict(r=4, lora_alpha=8, use_rslora=True, **EXPERTS[family])),
            ("e8", dict(r=8, lora_alpha=32, **EXPERTS[family]))]


@pytest.mark.parametrize("family, tp", [("qwen3_moe", 1), ("mixtral", 1),
                                        pytest.param("qwen3_moe", 2, marks=pytest.mark.slow)],
                         ids=["qwen3_moe", "mixtral", "qwen3_moe_tp2"])
def test_attention_and_expert_adapters_on_moe_match_peft(tmp_path, family, tp):
    """Base, an attention adapter and two on attention and every expert, in one step; TP 2
    on virtual devices: the expert stacks split as the experts are."""
    from xla_inference.parallel.sharding import build_mesh

    model_dir = save_tiny_family(tmp_path / "model", family)
    adapters = {name: save_adapter(model_dir, tmp_path / name, seed=20 + i, **fields)
                for i, (name, fields) in enumerate(moe_adapters(family))}
    engine = lora_engine(model_dir, mesh=build_mesh(tp))
    if tp > 1:
        experts = engine.params.layers[1].mlp.w_gate.sharding.spec
        b = engine.lora.stacks["eb"]["model.layers.1.mlp.experts.gate_proj"]
        assert tuple(b.sharding.spec)[::2] == (tuple(experts) + (None,) * 3)[:3:2] != (None, None)
    assert any(hasattr(layer.mlp, "router") for layer in engine.params.layers)  # MoE layers
    loaded = load_adapter(adapters["e8"], engine.lora.module_shapes, 16)
    assert {"model.layers.1.mlp.experts.up_proj", "model.layers.1.mlp.experts.down_proj"} \
        <= set(loaded.weights)
    _assert_mixed_adapters_match_peft(engine, model_dir, adapters)
    # Which slots' adapters have expert weights: the steps of base or m4 alone skip the
    # experts' LoRA products (layers/moe.py) and still matched peft above.
    slots = engine.lora.slot_of
    flags = np.asarray(engine.lora.stacks["expert_slots"])
    assert [bool(flags[slots[i]]) for i in (1, 2, 3)] == [False, True, True] and not flags[0]
    # The experts' adapters matter: without them peft gives other logits.
    attention_only = _without_experts(adapters["e8"], tmp_path / "e8_attention")
    assert np.abs(peft_logits(model_dir, adapters["e8"], PROMPTS[0])
                  - peft_logits(model_dir, attention_only, PROMPTS[0])).max() > 1e-2


@pytest.mark.slow  # > 20 s on a loaded 2-core machine
def test_expert_adapters_under_data_parallel_width_split_match_peft(tmp_path):
    """DP 2 x TP 2 without --enable-expert-parallel (the default): each expert's width split
    over the data and model axes together; the expert adapters' stacks follow, and base and
    three adapters mixed in one step still match transformers+peft (the expert-parallel
    split is served end to end by tests/lora/test_lora_moe_data_parallel_llm.py)."""
    from xla_inference.parallel.sharding import build_mesh

    model_dir = save_tiny_family(tmp_path / "model", "qwen3_moe", norm_topk_prob=True)
    adapters = {name: save_adapter(model_dir, tmp_path / name, seed=20 + i, **fields)
                for i, (name, fields) in enumerate(moe_adapters("qwen3_moe"))}
    engine = lora_engine(model_dir, mesh=build_mesh(2, 2))
    assert dict(engine.mesh.shape) == {"data": 2, "model": 2}
    gate = tuple(engine.params.layers[1].mlp.w_gate.sharding.spec)
    assert gate[0] is None and set(gate[-1]) == {"data", "model"}, gate  # width, not experts
    _assert_mixed_adapters_match_peft(engine, model_dir, adapters)


@pytest.mark.slow  # > 20 s on a loaded 2-core machine
@pytest.mark.parametrize("data_parallel", [1, 2], ids=["one_device", "dp2_tp2"])
def test_expert_adapters_over_int8_experts_match_peft_on_dequantized(tmp_path, data_parallel):
    """--quantization int8: the experts (and projections) stay quantized, their adapters'
    deltas are added in float; against transformers+peft on the dequantized weights
    (tolerance: tests/lora/test_lora_quantized.py). DP 2 x TP 2: the quantized experts
    split across the replicas by expert (8 experts, 2 a device), their adapters' stacks
    with them (lora/slots.LoraSlots.place), as without LoRA."""
    from tests.lora.test_lora_quantized import TOL
    from tests.quantization.test_online import save_dequantized
    from xla_inference.parallel.sharding import build_mesh
    from xla_inference.quantization.experts import PackedExperts
    from xla_inference.quantization.groups import INT8

    src = save_tiny_family(tmp_path / "model", "qwen3_moe")
    reference = save_dequantized(src, tmp_path / "ref", INT8)
    adapters = {name: save_adapter(reference, tmp_path / name, seed=20 + i, **fields)
                for i, (name, fields) in enumerate(moe_adapters("qwen3_moe"))}
    engine = lora_engine(src, quantization="int8",
                         mesh=build_mesh(2, data_parallel) if data_parallel > 1 else None)
    assert isinstance(engine.params.layers[1].mlp.w_gate, PackedExperts)
    if data_parallel > 1:
        across = ("data", "model")
        assert tuple(engine.params.layers[1].mlp.w_gate.values.sharding.spec)[0] == across
        for kind in ("ea", "eb"):
            for stack in engine.lora.stacks[kind].values():
                assert tuple(stack.sharding.spec)[0] == across, (kind, stack.sharding.spec)
                assert {s.data.shape[0] for s in stack.addressable_shards} == {2}
    assert "model.layers.1.mlp.experts.down_proj" in engine.lora.module_shapes
    _assert_mixed_adapters_match_peft(engine, reference, adapters, atol=TOL)


def _without_experts(src, dst):
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".experts" not in k},
              str(dst / "adapter_model.safetensors"))
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(dict(cfg, target_parameters=None)))
    return dst


def test_lora_target_modules_without_experts(tmp_path):
    """--lora-target-modules qkv_proj o_proj (vLLM's names): no expert or MLP stacks; an
    attention adapter is served within 2e-4 of peft, one on the experts is refused naming
    --lora-target-modules (its stacks were never allocated)."""
    model_dir = save_tiny_family(tmp_path / "model", "qwen3_moe")
    attention = [(f"m{r}", dict(r=r, lora_alpha=8, target_modules=ATTENTION)) for r in (2, 4, 8)]
    adapters = {name: save_adapter(model_dir, tmp_path / name, seed=30 + i, **fields)
                for i, (name, fields) in enumerate(attention + moe_adapters("qwen3_moe")[2:])}
    engine = lora_engine(model_dir, target_modules=["qkv_proj", "o_proj"])
    assert not engine.lora.stacks["eb"] and not engine.lora.stacks["ea"]
    assert {m.rpartition(".")[2] for m in engine.lora.module_shapes} == {
        "q_proj", "k_proj", "v_proj", "o_proj"}
    with pytest.raises(LoraError, match=r"mlp\.(experts|gate_proj).*--lora-target-modules"):
        load_adapter(adapters["e8"], engine.lora.module_shapes, 16,
                     target_modules=engine.lora.target_modules)
    del adapters["e8"]
    _assert_mixed_adapters_match_peft(engine, model_dir, adapters)


def test_unserved_expert_parameters_refused_by_name(tmp_path):
    model_dir = save_tiny_family(tmp_path / "model", "qwen3_moe")
    shapes = _targets(model_dir)
    assert "model.layers.0.mlp.gate_proj" in shapes  # the dense layer's MLP is a target
    assert shapes["model.layers.1.mlp.experts.gate_proj"] == (8, 48, 64)  # [E, out, in]
    router = save_adapter(model_dir, tmp_path / "router", seed=3, r=4, target_modules=["q_proj"],
                          target_parameters=["gate.weight"])
    with pytest.raises(LoraError, match="target_parameters"):
        load_adapter(router, shapes, 16)


def _targets(model_dir):
    import jax.numpy as jnp

    from xla_inference.lora.slots import decoder_targets
    from xla_inference.runner.build import Precision, load

    return decoder_targets(load(model_dir, Precision.uniform(jnp.float32)).params)


@pytest.mark.slow
@pytest.mark.vllm
def test_llm_int8_moe_expert_adapters_with_ngram_match_peft_greedy(tmp_path):
    """vllm.LLM --quantization int8 --enable-lora with n-gram speculation on a tiny
    Qwen3-MoE: base, an attention adapter and two on the experts in one batch (two device
    slots: a swap) give transformers+peft's greedy on the dequantized weights, drafts are
    accepted (the verify step reads each token's adapter), nothing compiles after warm-up."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from tests.e2e.engines import metric, num_compilations, shutdown, start_llm
    from tests.lora.lora_helpers import peft_greedy
    from tests.quantization.test_online import save_dequantized
    from xla_inference.quantization.groups import INT8

    model_dir = save_tiny_family(tmp_path / "model", "qwen3_moe")
    reference = save_dequantized(model_dir, tmp_path / "ref", INT8)
    adapters = {name: save_adapter(reference, tmp_path / name, seed=20 + i, **fields)
                for i, (name, fields) in enumerate(moe_adapters("qwen3_moe"))}
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
                            SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                            lora_request=requests, use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        after = num_compilations(llm)
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
    finally:
        shutdown(llm)
    want = [peft_greedy(reference, None if r is None else adapters[r.lora_name], p, 8)
            for p, r in zip(prompts, requests)]
    assert got == want
    assert len({tuple(w) for w in want}) == len(want)  # the adapters change the outputs
    assert accepted > 0
    assert after == before
