"""DeepSeek-V3's MTP layer as a drafter (models/deepseek_mtp.py through spec_decode/eagle.py)
against a float64 reference assembled from transformers' DeepSeek-V3 modules
(tests/deepseek_mtp_checkpoint.py): its logits over two ragged prompts, then its drafts over
a prompt step and a verify step with partly accepted drafts, given the same target hidden
states. Also its refusals."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.drafter_checks import assert_drafts_match_over_a_prompt_and_a_verify_step
from tests.deepseek_mtp_checkpoint import HIDDEN, VOCAB, TransformersMtp, save_tiny_deepseek_mtp
from tests.helpers import ENGINE_BLOCK
from xla_inference.layers.moe import MoeMlp
from xla_inference.loading.safetensors import CheckpointTensors, safetensors_files
from xla_inference.models import deepseek_mtp, deepseek_v3
from xla_inference.parallel.sharding import build_mesh, kv_cache_sharding
from xla_inference.runner.buckets import token_buckets
from xla_inference.spec_decode.eagle import EagleLimits, EagleProposer
from xla_inference.runner.requests import RequestState, build_step_batch

K = 3
TOL = 2e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = save_tiny_deepseek_mtp(tmp_path_factory.mktemp("mtp") / "deepseek")
    return path, TransformersMtp(path)


def _proposer(path, k=K, mesh=None):
    hf = json.loads((path / "config.json").read_text())
    cfg = deepseek_mtp.MtpConfig.from_hf(hf)
    tensors = CheckpointTensors(safetensors_files(path))
    params = deepseek_mtp.load_params(tensors, cfg, jnp.float32)
    assert params.embed is None and params.lm_head is None  # the target's, shared
    assert isinstance(params.block.mlp, MoeMlp)  # layer 3 >= first_k_dense_replace
    params = dataclasses.replace(params, embed=np.asarray(tensors["model.embed_tokens.weight"]),
                                 lm_head=jax.device_put(np.asarray(tensors["lm_head.weight"])))
    limits = EagleLimits(token_buckets=tuple(token_buckets(32)), max_num_seqs=4,
                         max_model_len=64, block_size=ENGINE_BLOCK, num_slots=64 * ENGINE_BLOCK,
                         groups=(0,), num_speculative_tokens=k)
    return EagleProposer(deepseek_mtp, params, cfg, limits, mesh or build_mesh(), jnp.float32)


def test_logits_match_the_transformers_reference_over_ragged_prompts(checkpoint):
    path, ref = checkpoint
    proposer = _proposer(path)
    rng = np.random.default_rng(0)
    reqs = [RequestState(f"r{i}", rng.integers(3, VOCAB, n).tolist(), n,
                         [list(range(1 + 16 * i, 17 + 16 * i))], 0) for i, n in enumerate((9, 14))]
    hidden = [rng.standard_normal((n, HIDDEN)) for n in (9, 14)]
    T = 32
    work = [(proposer._view(r, r.token_ids, 0), len(r.token_ids)) for r in reqs]
    batch = build_step_batch(work, proposer._layout(T))
    rows = np.zeros((T, HIDDEN), np.float32)
    rows[:9], rows[9:23] = hidden
    forward = jax.jit(deepseek_mtp.forward, static_argnums=4)
    _, y, fed_back = forward(proposer.params, proposer.kv, batch, jnp.asarray(rows),
                             proposer.cfg)
    got = np.asarray(deepseek_mtp.logits(proposer.params, y))
    assert np.array_equal(np.asarray(y), np.asarray(fed_back))
    for r, h, start in zip(reqs, hidden, (0, 9)):
        want = ref.logits(r.token_ids, h)
        np.testing.assert_allclose(got[start:start + len(h)], want, rtol=TOL, atol=TOL)
    # Position 0 reads no embedding (vLLM's mask): the token there does not change its row.
    other = list(reqs[0].token_ids)
    other[0] = (other[0] + 1) % VOCAB
    np.testing.assert_allclose(ref.logits(other, hidden[0])[0], ref.logits(reqs[0].token_ids,
                               hidden[0])[0])


def test_proposals_match_the_reference_over_a_prompt_and_a_verify_step(checkpoint):
    path, ref = checkpoint
    proposer = _proposer(path)
    assert_drafts_match_over_a_prompt_and_a_verify_step(
        proposer, ref, k=K, hidden_size=HIDDEN, vocab=VOCAB, rows=32,
        rng=np.random.default_rng(4))


def test_the_layer_split_over_tensor_parallel_devices_proposes_the_same(checkpoint):
    """Tensor parallel 2 (virtual CPU devices, tests/conftest.py): the block's per-head
    projections and experts are split over the model axis as the target's are, and the
    drafts still equal the float64 reference's."""
    path, ref = checkpoint
    proposer = _proposer(path, mesh=build_mesh(2))
    attn = proposer.params.block.attn
    assert "model" in tuple(attn.wq_nope.sharding.spec)
    assert len(attn.wq_nope.addressable_shards[0].data.shape) == 3
    assert attn.wq_nope.addressable_shards[0].data.shape[1] == attn.wq_nope.shape[1] // 2
    # Its latent cache is placed as a target layer's: MLA's one latent head holds every
    # head's keys and values, so every device keeps all of it (as in the target's engine).
    (latent,) = proposer.kv.arrays[0]
    mesh = proposer.mesh
    target_layer = deepseek_v3.kv_layers(proposer.cfg)[0]
    target_shape = (latent.shape[0], target_layer.num_kv_heads, target_layer.head_size)
    assert latent.shape == target_shape
    assert latent.sharding == kv_cache_sharding(proposer.cfg, target_shape, mesh)
    assert latent.sharding.is_fully_replicated
    assert_drafts_match_over_a_prompt_and_a_verify_step(
        proposer, ref, k=K, hidden_size=HIDDEN, vocab=VOCAB, rows=32,
        rng=np.random.default_rng(4))


@pytest.mark.parametrize("change, message", [
    (dict(num_nextn_predict_layers=0), "needs a checkpoint with MTP layers"),
    (dict(num_nextn_predict_layers=2), "one MTP layer (num_nextn_predict_layers 1), not 2"),
    (dict(architectures=["LlamaForCausalLM"]), "for DeepSeek-V3 targets"),
])
def test_unserved_configs_are_refused_by_name(checkpoint, change, message):
    hf = json.loads((checkpoint[0] / "config.json").read_text()) | change
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        deepseek_mtp.MtpConfig.from_hf(hf)


def test_a_checkpoint_without_the_mtp_layer_is_refused(tmp_path):
    from tests.models.test_deepseek_v3 import save_tiny_deepseek_v3

    path = save_tiny_deepseek_v3(tmp_path / "m", num_nextn_predict_layers=1)
    cfg = deepseek_mtp.MtpConfig.from_hf(json.loads((path / "config.json").read_text()))
    with pytest.raises(ValueError, match="no MTP layer weights"):
        deepseek_mtp.load_params(CheckpointTensors(safetensors_files(path)), cfg, jnp.float32)


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_online_quantization_quantizes_the_block_as_the_target_layers(checkpoint, method):
    """--quantization int8/fp8 on the float checkpoint: the MTP block (an MoE layer) comes out
    of _load_mtp_params quantized leaf for leaf as the target's MoE layer comes out of the
    target's load (runner/build.load), the same kinds (projections packed, expert stacks
    quantized) of the same dtypes; eh_proj stays float."""
    from types import SimpleNamespace

    from xla_inference.plugin.spec_decode import _load_mtp_params
    from xla_inference.quantization.experts import PackedExperts
    from xla_inference.quantization.packed import PackedWeight
    from xla_inference.runner.build import Precision, load

    path, _ = checkpoint
    precision = Precision.uniform(jnp.float32)
    cfg = deepseek_mtp.MtpConfig.from_hf(json.loads((path / "config.json").read_text()))
    config = SimpleNamespace(model_config=SimpleNamespace(quantization=method))
    mtp = _load_mtp_params(config, path, cfg, precision)
    target = load(path, precision, quantization=method).params.layers[-1]
    quantized = (PackedWeight, PackedExperts)

    def kinds(tree):
        leaves = jax.tree.leaves(tree, is_leaf=lambda leaf: isinstance(leaf, quantized))
        return [(type(leaf).__name__, str(jax.tree.leaves(leaf)[0].dtype)) for leaf in leaves]

    assert isinstance(target.mlp, MoeMlp) and isinstance(mtp.block.mlp, MoeMlp)
    assert kinds(mtp.block) == kinds(target)
    assert sum(kind in ("PackedWeight", "PackedExperts") for kind, _ in kinds(mtp.block)) >= 4
    assert isinstance(mtp.fc, np.ndarray) and mtp.fc.dtype == np.float32
