"""Vocabulary targets a deployment would serve wrong are refused by name when the adapter is
loaded (lora/peft.refuse_unserved_vocab_targets, called by plugin/model_runner.add_lora):
an LM head adapter with speculative decoding, and an embedding adapter on Gemma 3. The
per-request refusal of prompt logprobs with an LM head adapter: tests/plugin/test_lora_requests.py."""

import pytest

from tests.helpers import save_tiny_llama
from tests.lora.lora_helpers import save_adapter
from xla_inference.lora.peft import (LoraError, adapter_adapts_lm_head, load_adapter,
                                     refuse_unserved_vocab_targets)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_refusals")
    model_dir = save_tiny_llama(root / "model")
    return {name: save_adapter(model_dir, root / name, seed=i, r=4, target_modules=targets)
            for i, (name, targets) in enumerate([("head", ["lm_head"]),
                                                  ("embed", ["embed_tokens"]),
                                                  ("attn", ["q_proj", "v_proj"])])}, model_dir


@pytest.fixture(scope="module")
def loaded(adapters):
    """The adapters as the runner's add_lora reads them (module names as load_adapter's)."""
    import jax.numpy as jnp

    from xla_inference.lora.slots import decoder_targets
    from xla_inference.runner.build import Precision, load

    paths, model_dir = adapters
    f32 = jnp.dtype(jnp.float32)
    shapes = decoder_targets(load(model_dir, Precision(f32, f32, f32)).params)
    return {name: load_adapter(path, shapes, 16) for name, path in paths.items()}


def test_an_lm_head_adapter_is_refused_with_speculative_decoding(loaded):
    with pytest.raises(LoraError, match="adapts lm_head.*speculative decoding"):
        refuse_unserved_vocab_targets(loaded["head"], "/a", speculative_decoding=True,
                                      family="llama")
    refuse_unserved_vocab_targets(loaded["head"], "/a", speculative_decoding=False, family="llama")
    for other in ("embed", "attn"):
        refuse_unserved_vocab_targets(loaded[other], "/a", speculative_decoding=True,
                                      family="llama")


def test_an_embedding_adapter_is_refused_on_gemma3(loaded):
    embed = loaded["embed"]
    with pytest.raises(LoraError, match="embed_tokens of a gemma3 model.*PEFT adds it unscaled"):
        refuse_unserved_vocab_targets(embed, "/a", speculative_decoding=False, family="gemma3")
    refuse_unserved_vocab_targets(embed, "/a", speculative_decoding=True, family="llama")


    for other in ("head", "attn"):
        refuse_unserved_vocab_targets(loaded[other], "/a", speculative_decoding=False,
                                      family="gemma3")


def test_the_lm_head_is_found_in_the_adapter_file(adapters, tmp_path):
    """What the front-end reads per request: the file's keys, as load_adapter names them."""
    adapters, _ = adapters
    assert adapter_adapts_lm_head(adapters["head"])
    assert not adapter_adapts_lm_head(adapters["embed"])
    assert not adapter_adapts_lm_head(adapters["attn"])
    assert not adapter_adapts_lm_head(tmp_path)  # no weights: load_adapter refuses it
