"""LoRA adapters on the token embedding and the LM head (PEFT's embed_tokens and lm_head,
which vLLM serves): against transformers+peft within 2e-4 with base and three adapters (one
on both, one on the LM head, one on the embedding alone) mixed in one step; TP 2 on virtual
devices equal to one device; through vllm.LLM, two of them mixed in one batch give
transformers+peft's greedy tokens."""

import numpy as np
import pytest

from tests.helpers import save_tiny_llama
from tests.lora.lora_helpers import peft_greedy, save_adapter
from tests.lora.test_lora_engine import PROMPTS, _assert_mixed_adapters_match_peft, lora_engine

VOCAB_ADAPTERS = [("both", dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens",
                                                                   "lm_head"])),
                  ("head", dict(r=8, lora_alpha=8, target_modules=["lm_head", "v_proj"])),
                  ("embed", dict(r=2, lora_alpha=8, target_modules=["embed_tokens"]))]


@pytest.fixture(scope="module")
def llama_vocab_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    model_dir = save_tiny_llama(root / "model")
    return model_dir, {name: save_adapter(model_dir, root / name, seed=40 + i, **fields)
                       for i, (name, fields) in enumerate(VOCAB_ADAPTERS)}


@pytest.mark.parametrize("tp, dp", [(1, 1), (2, 1), (1, 2)], ids=["one_device", "tp2", "dp2"])
def test_embedding_and_lm_head_adapters_match_peft(llama_vocab_adapters, tp, dp):
    """DP 2: each replica's tokens' embedding deltas inside its own program, the LM head's
    for the rows gathered from both (runner/engine._in_scheduler_order)."""
    from xla_inference.parallel.sharding import build_mesh

    model_dir, adapters = llama_vocab_adapters
    engine = lora_engine(model_dir, max_loras=3 if dp == 1 else 2, mesh=build_mesh(tp, dp))
    assert {"model.embed_tokens", "lm_head"} <= set(engine.lora.module_shapes)
    # DP 2: pages 1.. belong to replica 0, pages 32.. to replica 1 (both mix adapters)
    _assert_mixed_adapters_match_peft(engine, model_dir, adapters,
                                      first_blocks=None if dp == 1 else [1, 33, 9, 41])
    slots = engine.lora.slot_of
    has = {m: np.asarray(f) for m, f in engine.lora.stacks["vocab_slots"].items()}
    # Which slots adapt each (a step of the others alone skips its delta: lax.cond).
    assert [bool(has["lm_head"][slots[i]]) for i in (1, 2, 3)] == [True, True, False]
    assert [bool(has["model.embed_tokens"][slots[i]]) for i in (1, 2, 3)] == [True, False, True]
    for path in list(adapters.values())[1:]:  # the embedding / LM head alone change logits
        from tests.lora.lora_helpers import peft_logits

        assert np.abs(peft_logits(model_dir, path, PROMPTS[0])
                      - peft_logits(model_dir, None, PROMPTS[0])).max() > 1e-2


def test_lora_target_modules_leave_out_vocab(llama_vocab_adapters):
    """--lora-target-modules without lm_head: no vocabulary stacks, its adapter refused."""
    from xla_inference.lora.peft import LoraError, load_adapter

    model_dir, adapters = llama_vocab_adapters
    engine = lora_engine(model_dir, target_modules=["q_proj", "v_proj", "embed_tokens"])
    assert set(engine.lora.stacks["vocab"]) == {"model.embed_tokens"}
    with pytest.raises(LoraError, match="lm_head.*--lora-target-modules"):
        load_adapter(adapters["head"], engine.lora.module_shapes, 16,
                     target_modules=engine.lora.target_modules)
    load_adapter(adapters["embed"], engine.lora.module_shapes, 16,
                 target_modules=engine.lora.target_modules)


@pytest.mark.slow
@pytest.mark.vllm
def test_llm_embedding_and_lm_head_adapters_match_peft_greedy(llama_vocab_adapters):
    """vllm.LLM --enable-lora: base and two adapters (embedding + LM head, LM head alone)
    mixed in one batch give transformers+peft's greedy tokens."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from tests.e2e.engines import num_compilations, shutdown, start_llm

    model_dir, adapters = llama_vocab_adapters
    requests = [None, LoRARequest("both", 1, str(adapters["both"])),
                LoRARequest("head", 2, str(adapters["head"]))]
    rng = np.random.default_rng(9)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (7, 13, 10, 5, 16, 9)]
    chosen = [requests[i % 3] for i in range(len(prompts))]
    llm = start_llm(model_dir, enable_lora=True, max_loras=2, max_lora_rank=16)
    try:
        before = num_compilations(llm)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                            lora_request=chosen, use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        after = num_compilations(llm)
    finally:
        shutdown(llm)
    want = [peft_greedy(model_dir, None if r is None else adapters[r.lora_name], p, 6)
            for p, r in zip(prompts, chosen)]
    assert got == want
    assert len({tuple(w) for w in want[:3]}) == 3  # the adapters change the outputs
    assert after == before
