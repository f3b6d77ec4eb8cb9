"""lora/slots.LoraSlots.stage: under pipeline stages the dense stacks are held by place in a
stage ([N, ...], stage s's block from global layer s * L/N + j), so a step reads them
without restacking; a slot write lands each layer's adapter in its own stage's block, and
a target in the layer of only some stages is refused at start-up."""

import jax.numpy as jnp
import numpy as np
import pytest

from xla_inference.lora.peft import LoraAdapter
from xla_inference.lora.slots import LoraSlots

IN, OUT, RANK = 8, 6, 2


def _shapes(layers, suffixes=("q_proj", "k_proj")):
    return {f"model.layers.{i}.self_attn.{s}": (OUT, IN) for i in range(layers) for s in suffixes}


def test_slot_write_lands_in_each_layers_stage_block():
    slots = LoraSlots(_shapes(4), max_loras=2, max_rank=RANK, max_cpu_loras=2,
                      dtype=jnp.float32)
    slots.stage(stages=2, per_stage=2)
    assert set(slots.stacks["b"]) == {"0.self_attn.q_proj", "0.self_attn.k_proj",
                                      "1.self_attn.q_proj", "1.self_attn.k_proj"}
    rng = np.random.default_rng(0)
    weights = {f"model.layers.{i}.self_attn.q_proj": (rng.standard_normal((RANK, IN)),
                                                      rng.standard_normal((OUT, RANK)))
               for i in range(4)}
    slots.add(7, LoraAdapter("q", {m: (a.astype(np.float32), b.astype(np.float32))
                                   for m, (a, b) in weights.items()}))
    assert slots.slots_for([7]) == {0: 0, 7: 1}
    columns = slice(0, RANK)  # slot 1
    for layer, (a, b) in enumerate((weights[f"model.layers.{i}.self_attn.q_proj"])
                                   for i in range(4)):
        stage, j = divmod(layer, 2)
        stacked_b = np.asarray(slots.stacks["b"][f"{j}.self_attn.q_proj"])
        stacked_a = np.asarray(slots.stacks["a"][f"{j}.self_attn.qkv_proj"])  # [N, G, L*r, in]
        np.testing.assert_allclose(stacked_b[stage][:, columns], b, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(slots.stacks["b_rows"][f"{j}.self_attn.q_proj"])
                                   [stage][columns], b.T, rtol=1e-6)
        np.testing.assert_allclose(stacked_a[stage, 1][columns], a, rtol=1e-6)  # q: member 1
        assert not stacked_a[stage, 0].any()  # k_proj: no weights in this adapter
    assert not np.asarray(slots.stacks["b"]["0.self_attn.q_proj"])[:, :, RANK:].any()  # slot 2


def test_target_in_only_some_stages_refused():
    shapes = _shapes(4, ("k_proj",)) | {"model.layers.1.self_attn.q_proj": (OUT, IN)}
    slots = LoraSlots(shapes, max_loras=1, max_rank=RANK, max_cpu_loras=1, dtype=jnp.float32)
    with pytest.raises(ValueError, match="q_proj targeted in layer 1 of every stage"):
        slots.stage(stages=2, per_stage=2)
