"""The EAGLE-3 head (models/eagle3.py) and its drafting loop (spec_decode/eagle.py) against a
float64 numpy reference of the same head given the same target hidden states, over a
prompt step and a verify step with partly accepted drafts; the target's aux hidden states
against transformers' hidden states of the named layers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.eagle3_checkpoint import HIDDEN, NumpyEagle3, save_tiny_eagle3
from tests.helpers import ENGINE_BLOCK, engine_request, hf_model, save_tiny_llama
from xla_inference.loading.safetensors import CheckpointTensors, safetensors_files
from xla_inference.models import eagle3
from xla_inference.parallel.sharding import build_mesh
from xla_inference.runner import compile_counter
from xla_inference.runner.buckets import token_buckets
from xla_inference.spec_decode.eagle import EagleLimits, EagleProposer
from xla_inference.runner.requests import RequestState

K = 3
AUX = (0, 1, 2)
WIDTH = HIDDEN * (1 + len(AUX))  # the target step's hidden columns: final, then the aux


def _head(path, **load):
    import json

    cfg = eagle3.Eagle3Config.from_hf(json.loads((path / "config.json").read_text()), 2)
    params = eagle3.load_params(CheckpointTensors(safetensors_files(path)), cfg, jnp.float32,
                                **load)
    return cfg, params


def _proposer(cfg, params, max_tokens=16):
    limits = EagleLimits(token_buckets=tuple(token_buckets(max_tokens)), max_num_seqs=4,
                         max_model_len=64, block_size=ENGINE_BLOCK,
                         num_slots=64 * ENGINE_BLOCK, groups=(0,), num_speculative_tokens=K)
    return EagleProposer(eagle3, params, cfg, limits, build_mesh(), jnp.float32)


def _request(rid, prompt, first_block):
    blocks = list(range(first_block, first_block + 16))
    return RequestState(rid, list(prompt), len(prompt), [blocks], 0)


class Target:
    """Stands in for the target: a fixed random aux state per (request, position), the
    rows of a step's hidden states [T, WIDTH] (final columns and rejected rows random)."""

    def __init__(self, seed=1):
        self.rng = np.random.default_rng(seed)
        self.aux = {}

    def true_aux(self, rid, position):
        key = (rid, position)
        if key not in self.aux:
            self.aux[key] = self.rng.standard_normal(len(AUX) * HIDDEN).astype(np.float32)
        return self.aux[key]

    def step_hidden(self, scheduled, kept, T):
        """kept[i]: how many of request i's scheduled positions the step keeps."""
        hidden = self.rng.standard_normal((T, WIDTH)).astype(np.float32)
        row = 0
        for (req, n), keep in zip(scheduled, kept):
            for j in range(keep):
                hidden[row + j, HIDDEN:] = self.true_aux(req.req_id, req.num_computed_tokens + j)
            row += n
        return jax.device_put(hidden)  # no compile (jnp.asarray would build one)


def _reference(ref, target, req):
    N = len(req.token_ids)
    aux = np.stack([target.true_aux(req.req_id, p) for p in range(N - 1)]).astype(np.float64)
    return ref.propose(req.token_ids, aux, K)


@pytest.mark.parametrize("with_embed", [True, False])
def test_proposals_match_a_float64_reference_over_a_prompt_and_a_verify_step(tmp_path, with_embed):
    path = save_tiny_eagle3(tmp_path / "head", AUX, with_embed=with_embed)
    target_embed = np.random.default_rng(7).standard_normal((128, HIDDEN)).astype(np.float32)
    cfg, params = _head(path)
    if not with_embed:
        assert params.embed is None
        params = dataclasses.replace(params, embed=target_embed)
    assert cfg.draft_vocab_size == 96 and cfg.aux_layer_ids == AUX
    proposer = _proposer(cfg, params)
    if with_embed:  # (once: warm-up compiles every bucket)
        proposer.warm_up(jnp.float32)
    compile_counter.install()
    before = compile_counter.num_compilations()
    ref = NumpyEagle3(path, None if with_embed else target_embed.astype(np.float64))
    target = Target()
    rng = np.random.default_rng(2)
    reqs = [_request(f"r{i}", rng.integers(3, 128, n), 1 + 16 * i)
            for i, n in enumerate((3, 6, 9))]

    # Step 1: the prompts (the longest in two chunks: its first chunk drafts nothing).
    scheduled = [(reqs[0], 3), (reqs[1], 6), (reqs[2], 5)]
    proposer.saw_target_step(scheduled, target.step_hidden(scheduled, [3, 6, 5], 16))
    sampled = []
    for req, n in scheduled:
        req.num_computed_tokens += n
        done = req.num_computed_tokens == len(req.token_ids)
        if done:
            req.token_ids.append(int(rng.integers(3, 128)))
        sampled.append([req.token_ids[-1]] if done else [])
    drafts = proposer.propose(reqs, sampled)
    assert drafts[2] == []
    for req, got in zip(reqs[:2], drafts[:2]):
        assert got == _reference(ref, target, req)

    # Step 2: verify request 0's drafts (one accepted, then a correction), decode nothing
    # else but request 1's drafts (all rejected), finish request 2's prompt.
    scheduled = [(reqs[0], 1 + K), (reqs[1], 1 + K), (reqs[2], 4)]
    proposer.saw_target_step(scheduled, target.step_hidden(scheduled, [2, 1, 4], 16))
    emitted = [drafts[0][:1] + [int(rng.integers(3, 128))], [int(rng.integers(3, 128))], None]
    for (req, n), out in zip(scheduled, emitted):
        if out is None:
            req.num_computed_tokens += n
            out = [int(rng.integers(3, 128))]
        else:
            req.num_computed_tokens += len(out)
        req.token_ids.extend(out)
    drafts = proposer.propose(reqs, [[1]] * 3)
    for req, got in zip(reqs, drafts):
        assert len(got) == K
        assert got == _reference(ref, target, req)
    if with_embed:
        assert compile_counter.num_compilations() == before


def test_drafts_stop_at_the_pages_and_max_model_len(tmp_path):
    cfg, params = _head(save_tiny_eagle3(tmp_path / "head", AUX))
    proposer = _proposer(cfg, params)
    short = RequestState("s", list(range(3, 10)), 7, [[1, 2]], 0)  # 8 slots for 7 tokens
    proposer.saw_target_step([(short, 7)], jnp.zeros((16, WIDTH), jnp.float32))
    short.num_computed_tokens = 7
    short.token_ids.append(11)
    # Draft j writes KV at N + j - 3 (N = 8): j = 2 at 7, j = 3 at 8 (no page).
    assert len(proposer.propose([short], [[11]])[0]) == 2


def test_default_aux_layers_and_refusals():
    assert eagle3.aux_layer_ids({}, 32) == (2, 16, 29)
    assert eagle3.aux_layer_ids({"eagle_aux_hidden_state_layer_ids": [5, 1, 3]}, 8) == (1, 3, 5)
    with pytest.raises(ValueError, match="outside"):
        eagle3.aux_layer_ids({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [9]}}, 8)
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                num_hidden_layers=1)
    for extra, name in (({"num_hidden_layers": 2}, "decoder layers"),
                        ({"norm_before_fc": True}, "norm_before_fc"),
                        ({"fc_norm": True}, "fc_norm")):
        with pytest.raises(ValueError, match=name):
            eagle3.Eagle3Config.from_hf({**base, **extra}, 8)


def test_target_aux_states_are_transformers_hidden_states_of_those_layers(tmp_path):
    """vLLM's aux id i: the residual stream after i layers, transformers' hidden_states[i]."""
    import torch

    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    model_dir = save_tiny_llama(tmp_path / "target")
    model = load(model_dir, Precision.uniform(jnp.float32))
    model.family = eagle3.with_aux_hidden_states(model.family, model.cfg, (0, 2, 1))  # sorted by the wrapper
    engine = build_engine(model, EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK,
                                              max_num_tokens=16, max_num_seqs=4,
                                              max_model_len=64))
    prompt = list(range(5, 16))
    req = engine_request("a", prompt, 1)
    step = engine.forward([(req, len(prompt))])
    hidden = np.asarray(step.hidden)[:len(prompt)]
    with torch.no_grad():
        out = hf_model(model_dir)(torch.tensor([prompt]), output_hidden_states=True)
    states = [h[0].numpy() for h in out.hidden_states]
    # The final (normed) states, then the aux in ascending layer order.
    np.testing.assert_allclose(hidden[:, HIDDEN:2 * HIDDEN], states[0], atol=1e-5)
    np.testing.assert_allclose(hidden[:, 2 * HIDDEN:3 * HIDDEN], states[1], atol=1e-4)
    # After the last layer: the final hidden states are its normed copy (transformers'
    # last hidden_states entry is normed already).
    aux2, final_norm = hidden[:, 3 * HIDDEN:], hf_model(model_dir).model.norm.weight.detach().numpy()
    normed = final_norm * aux2 / np.sqrt(np.mean(aux2**2, -1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(hidden[:, :HIDDEN], normed, atol=1e-4)
    np.testing.assert_allclose(hidden[:, :HIDDEN], states[2], atol=1e-4)
    logits = np.asarray(step.logits)[0]
    np.testing.assert_allclose(logits, out.logits[0, -1].numpy(), atol=1e-4)


def test_only_dense_decoder_targets_get_aux_hidden_states():
    from xla_inference.models import gemma3, llama

    cfg = llama.LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8, num_layers=2,
                            num_heads=1, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-5,
                            rope_theta=1e4, rope_scaling=None, tie_word_embeddings=False)
    wrapped = eagle3.with_aux_hidden_states(llama.FAMILY, cfg, (0, 1))
    assert eagle3.returns_aux_hidden_states(wrapped)
    assert not eagle3.returns_aux_hidden_states(llama.FAMILY)
    with pytest.raises(ValueError, match="dense decoder families"):
        eagle3.with_aux_hidden_states(gemma3.FAMILY, cfg, (0, 1))
