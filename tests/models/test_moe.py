"""Mixture of experts: the grouped (ragged_dot) block against its dense reference, and the
native Qwen3-MoE and Mixtral against transformers on tiny random checkpoints."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import (assert_config_edit_names_tensor, assert_ragged_logits, hf_logits,
                           read_json, save_tiny_family, tiny_engine)
from tests.models.test_families import TOL, _expected
from xla_inference.layers.mlp import GatedMlp
from xla_inference.layers.moe import MoeConfig, MoeMlp, moe_mlp, moe_mlp_dense, route
from xla_inference.models import mixtral, qwen3_moe
from xla_inference.models.loader import load_model

LAYER_TOL = 1e-5  # float32, the same products summed in another order


def _random_moe(seed: int, num_experts=8, D=16, F=24, num_unused=0) -> MoeMlp:
    """Random expert weights; the router gives the last `num_unused` experts such negative
    logits (through the constant feature 0 of `_inputs`) that no token picks them."""
    keys = jax.random.split(jax.random.key(seed), 4)
    router = jax.random.normal(keys[0], (D, num_experts))
    router = router.at[0, num_experts - num_unused:].set(-100.0)
    scaled = lambda k, shape: jax.random.normal(k, shape) / np.sqrt(shape[1])  # noqa: E731
    return MoeMlp(router=router, w_gate=scaled(keys[1], (num_experts, D, F)),
                  w_up=scaled(keys[2], (num_experts, D, F)),
                  w_down=scaled(keys[3], (num_experts, F, D)))


def _inputs(seed: int, T: int, D=16) -> jax.Array:
    return jax.random.normal(jax.random.key(100 + seed), (T, D)).at[:, 0].set(1.0)


@pytest.mark.parametrize("T,k,norm,num_unused", [
    (13, 2, True, 3), (13, 2, False, 3), (29, 3, False, 0), (1, 2, True, 0), (7, 1, True, 6)])
def test_grouped_equals_dense(T, k, norm, num_unused):
    p, x = _random_moe(T, num_unused=num_unused), _inputs(T, T)
    cfg = MoeConfig(num_experts=8, num_experts_per_tok=k, intermediate_size=24, norm_topk_prob=norm)
    _, experts = route(p, x, cfg)
    counts = np.bincount(np.asarray(experts).ravel(), minlength=8)
    assert counts.sum() == T * k and (counts[8 - num_unused:] == 0).all()
    if num_unused == 6:  # k = 1 over two experts: both get tokens, the rest none
        assert (counts[:2] > 0).all()
    got = jax.jit(moe_mlp, static_argnums=2)(p, x, cfg)
    np.testing.assert_allclose(got, moe_mlp_dense(p, x, cfg), rtol=LAYER_TOL, atol=LAYER_TOL)


def test_routing_weights():
    p, x = _random_moe(0), _inputs(0, 5)
    logits = np.asarray(x @ p.router, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top2 = np.sort(probs, axis=-1)[:, ::-1][:, :2]
    for norm in (False, True):
        cfg = MoeConfig(num_experts=8, num_experts_per_tok=2, intermediate_size=24,
                        norm_topk_prob=norm)
        weights, experts = route(p, x, cfg)
        np.testing.assert_array_equal(experts, np.argsort(-probs, axis=-1)[:, :2])
        want = top2 / top2.sum(-1, keepdims=True) if norm else top2
        np.testing.assert_allclose(weights, want, rtol=1e-5)


VARIANTS = {
    # Layer 0 dense (mlp_only_layers), layer 1 experts; routing weights not renormalised.
    "qwen3_moe": ("qwen3_moe", {}),
    # Layer 0 dense through decoder_sparse_step 2 instead; weights renormalised.
    "qwen3_moe-norm": ("qwen3_moe", dict(mlp_only_layers=[], decoder_sparse_step=2,
                                         norm_topk_prob=True)),
    "mixtral": ("mixtral", {}),
    "mixtral-window": ("mixtral", dict(sliding_window=8)),
}


def _check_family_switches(model_dir, variant, params):
    """The layers are dense or MoE as configured, and norm_topk_prob changes transformers'
    logits (so that matching them proves it is applied)."""
    hf = read_json(model_dir / "config.json")
    kinds = [type(layer.mlp) for layer in params.layers]
    assert kinds == ([GatedMlp, MoeMlp] if variant.startswith("qwen3_moe") else [MoeMlp, MoeMlp])
    if "norm_topk_prob" in hf:
        tokens = list(range(3, 20))
        flipped = hf_logits(model_dir, tokens, attn_implementation="eager",
                            norm_topk_prob=not hf["norm_topk_prob"])
        as_configured = hf_logits(model_dir, tokens, attn_implementation="eager")
        assert np.abs(flipped - as_configured).max() > 0.01


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_ragged(tmp_path, variant):
    family, overrides = VARIANTS[variant]
    model_dir = save_tiny_family(tmp_path / "m", family, **overrides)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, size=n).tolist() for n in (11, 23, 14)]
    expected = [_expected(model_dir, p) for p in prompts]
    engine = tiny_engine(model_dir)
    _check_family_switches(model_dir, variant, engine.params)
    # Step 1: full prefill of r0, first chunk of r1, r2's prompt minus its last token.
    # Step 2: r1 the rest (a chunk starting past the window), r2 a decode step at position 13.
    assert_ragged_logits(engine, prompts, expected, [{0: 11, 1: 9, 2: 13}, {1: 14, 2: 1}], TOL)


def test_configs_read_the_moe_switches():
    base = dict(vocab_size=8, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2)
    q = qwen3_moe.FAMILY.config_from_hf({**base, "num_experts": 16, "moe_intermediate_size": 32,
                                  "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert q.moe_layers == (False, True, False, False) and q.qk_norm
    assert q.moe == MoeConfig(num_experts=16, num_experts_per_tok=2, intermediate_size=32,
                              norm_topk_prob=False)
    # transformers >= 5 saves num_experts as num_local_experts.
    q = qwen3_moe.FAMILY.config_from_hf({**base, "num_local_experts": 4, "moe_intermediate_size": 32,
                                  "norm_topk_prob": True})
    assert q.moe_layers == (True,) * 4 and q.moe.num_experts == 4 and q.moe.norm_topk_prob
    m = mixtral.FAMILY.config_from_hf({**base, "num_local_experts": 8, "sliding_window": 4096})
    assert m.moe == MoeConfig(num_experts=8, num_experts_per_tok=2, intermediate_size=96,
                              norm_topk_prob=True)
    assert m.sliding_windows == (4096,) * 4 and not m.qk_norm


def _fuse_experts(model_dir, prefix: str, fused_prefix: str, names, num_experts: int):
    """Rewrite the checkpoint in transformers >= 5's fused expert layout."""
    from safetensors.numpy import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    for layer in range(2):
        old, new = prefix.format(layer), fused_prefix.format(layer)
        per_expert = [[tensors.pop(f"{old}experts.{e}.{n}.weight") for e in range(num_experts)]
                      for n in names]
        tensors[f"{new}experts.gate_up_proj"] = np.concatenate(
            [np.stack(per_expert[0]), np.stack(per_expert[1])], axis=1)
        tensors[f"{new}experts.down_proj"] = np.stack(per_expert[2])
        tensors[f"{new}gate.weight"] = tensors.pop(f"{old}gate.weight")
    save_file(tensors, path)


@pytest.mark.parametrize("family,prefix,fused_prefix,names", [
    ("qwen3_moe", "model.layers.{}.mlp.", "model.layers.{}.mlp.",
     ("gate_proj", "up_proj", "down_proj")),
    ("mixtral", "model.layers.{}.block_sparse_moe.", "model.layers.{}.mlp.", ("w1", "w3", "w2")),
])
def test_fused_expert_layout_loads_the_same(tmp_path, family, prefix, fused_prefix, names):
    overrides = dict(mlp_only_layers=[]) if family == "qwen3_moe" else {}
    model_dir = save_tiny_family(tmp_path / "m", family, **overrides)
    _, _, per_expert = load_model(model_dir, jnp.float32)
    _fuse_experts(model_dir, prefix, fused_prefix, names, num_experts=8)
    _, _, fused = load_model(model_dir, jnp.float32)
    for a, b in zip(jax.tree.leaves(per_expert), jax.tree.leaves(fused), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("family,edit,tensor", [
    # Experts of another width than the config's.
    ("qwen3_moe", ('"moe_intermediate_size": 48', '"moe_intermediate_size": 32'),
     "model.layers.1.mlp.experts.0.gate_proj.weight"),
    # A layer the config makes sparse holds a dense MLP.
    ("qwen3_moe", ('"mlp_only_layers": [\n    0\n  ]', '"mlp_only_layers": []'),
     "model.layers.0.mlp.gate.weight"),
    # More experts than the checkpoint has: the router's shape tells.
    ("mixtral", ('"num_local_experts": 8', '"num_local_experts": 16'),
     "model.layers.0.block_sparse_moe.gate.weight"),
    ("mixtral", ('"intermediate_size": 96', '"intermediate_size": 64'),
     "model.layers.0.block_sparse_moe.experts.0.w1.weight"),
])
def test_mismatched_weights_name_the_tensor(tmp_path, family, edit, tensor):
    model_dir = save_tiny_family(tmp_path / "m", family)
    assert_config_edit_names_tensor(model_dir, edit, tensor)
