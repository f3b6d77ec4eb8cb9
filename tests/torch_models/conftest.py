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


def torch_engine(model_dir, mesh=None, narrow_dtype=None, kv_dtype=None, **args):
    """A float32 engine of the torch path (pages of tests.helpers.ENGINE_BLOCK tokens), as
    tests.helpers.tiny_engine builds the native one: projections in narrow_dtype and the KV
    cache in kv_dtype if given."""
    import jax.numpy as jnp

    from tests.helpers import ENGINE_BLOCK
    from xla_inference.runner.build import Precision, build_engine
    from xla_inference.runner.engine import EngineConfig
    from xla_inference.torch_models.loader import load

    f32 = jnp.dtype(jnp.float32)
    precision = Precision(jnp.dtype(narrow_dtype or f32), f32, jnp.dtype(kv_dtype or f32))
    model = load(vllm_config(model_dir, **args), precision, mesh=mesh)
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


# MoE architectures we have no native code for: (transformers config, its MoE settings).
# GLM-4.5 routes as DeepSeek-V3 does (sigmoid scores in 2 groups of which 1 is eligible, a
# correction bias, renormalised, scaled by 2.5) with a shared expert; Qwen2-MoE has a gated
# shared expert; OLMoE routes by a plain softmax top-k.
MOE_ARCHITECTURES = {
    "glm4_moe": ("Glm4MoeConfig", dict(head_dim=32, moe_intermediate_size=48, n_routed_experts=8,
                                       n_shared_experts=1, n_group=2, topk_group=1,
                                       first_k_dense_replace=1, routed_scaling_factor=2.5)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(moe_intermediate_size=48, num_experts=8,
                                         shared_expert_intermediate_size=64)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8)),
}


def save_tiny_moe(path, name: str):
    """A tiny random checkpoint of MOE_ARCHITECTURES[name], routing each token to 2 experts
    with router weights large enough that the routing is decisive. GLM-4.5's correction
    bias (zeros from transformers) is drawn at random, large enough to change choices."""
    import torch
    import transformers

    from tests.helpers import rewrite_checkpoint, save_tiny_model

    config_name, own = MOE_ARCHITECTURES[name]
    config = getattr(transformers, config_name)(**{**COMMON, **own}, num_experts_per_tok=2,
                                                initializer_range=0.1)
    saved = save_tiny_model(path / "drawn", config)
    generator = torch.Generator().manual_seed(1)

    def draw_bias(tensor_name, t):
        if "e_score_correction_bias" not in tensor_name:
            return t
        return 0.3 * torch.randn(t.shape, generator=generator, dtype=t.dtype)
    return rewrite_checkpoint(saved, path / "model", draw_bias)
