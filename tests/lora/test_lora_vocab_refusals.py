"""Vocabulary targets a deployment would serve wrong are refused by name when the adapter is
loaded (lora/peft.refuse_unserved_vocab_targets, called by plugin/model_runner.add_lora):
an embedding adapter on Gemma 3. (An LM head adapter is served with speculative decoding
and prompt logprobs: test_lora_head_scoring.py.)"""

import pytest

from tests.helpers import save_tiny_llama
from tests.lora.lora_helpers import save_adapter
from xla_inference.lora.peft import LoraError, load_adapter, refuse_unserved_vocab_targets


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


def test_an_embedding_adapter_is_refused_on_gemma3(loaded):
    embed = loaded["embed"]
    with pytest.raises(LoraError, match="embed_tokens of a gemma3 model.*PEFT adds it unscaled"):
        refuse_unserved_vocab_targets(embed, "/a", family="gemma3")
    refuse_unserved_vocab_targets(embed, "/a", family="llama")
    for other in ("head", "attn"):
        refuse_unserved_vocab_targets(loaded[other], "/a", family="gemma3")
