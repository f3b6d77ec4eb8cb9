"""Tiny random checkpoints of architectures xla-inference has no native code for, and the
torch path's engine for them, built as the worker builds it."""

import pytest

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

# Each with what sets it apart from Llama: Granite's four multipliers, Cohere's LayerNorm,
# parallel attention and MLP and logit scale, StableLM's partial rotary and q/k/v biases,
# Phi-3's fused qkv and gate_up projections.
ARCHITECTURES = {
    "phi3": ("Phi3Config", {}),
    "granite": ("GraniteConfig", dict(embedding_multiplier=2.0, residual_multiplier=0.5,
                                      attention_multiplier=0.2, logits_scaling=3.0)),
    "cohere": ("CohereConfig", dict(logit_scale=0.5, use_qk_norm=False)),
    "stablelm": ("StableLmConfig", dict(partial_rotary_factor=0.5, use_qkv_bias=True)),
}


def save_tiny_architecture(path, name: str, **overrides):
    import transformers

    from tests.helpers import save_tiny_model

    config_name, own = ARCHITECTURES[name]
    config = getattr(transformers, config_name)(**{**COMMON, **own, **overrides})
    return save_tiny_model(path, config)


def vllm_config(model_dir, **args):
    """vLLM's config for a checkpoint, through EngineArgs as `vllm serve` builds it."""
    from vllm.engine.arg_utils import EngineArgs

    args = {"dtype": "float32", "max_model_len": 128, "block_size": 4, **args}
    return EngineArgs(model=str(model_dir), **args).create_engine_config()


def torch_engine(model_dir, mesh=None, narrow_dtype=None, **args):
    """A float32 engine of the torch path (pages of tests.helpers.ENGINE_BLOCK tokens), as
    tests.helpers.tiny_engine builds the native one: projections in narrow_dtype if given."""
    import jax.numpy as jnp

    from tests.helpers import ENGINE_BLOCK
    from xla_inference.runner.build import Precision, build_engine
    from xla_inference.runner.engine import EngineConfig
    from xla_inference.torch_models.loader import load

    f32 = jnp.dtype(jnp.float32)
    precision = Precision(jnp.dtype(narrow_dtype or f32), f32, f32)
    model = load(vllm_config(model_dir, **args), precision)
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=64,
                        max_num_seqs=8, max_model_len=128)
    return build_engine(model, ecfg, mesh=mesh)


@pytest.fixture(scope="session")
def tiny_architecture(tmp_path_factory):
    """name -> a saved tiny checkpoint of that architecture (one per session)."""
    saved = {}

    def make(name):
        if name not in saved:
            saved[name] = save_tiny_architecture(tmp_path_factory.mktemp(name), name)
        return saved[name]
    return make
