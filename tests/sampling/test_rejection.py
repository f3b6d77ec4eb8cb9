"""Rejection sampling on device against a float64 numpy port of vLLM 0.32's rules
(vllm/v1/sample/rejection_sampler.py, written from reading it) and exact distributions."""

import dataclasses

import jax
import numpy as np
import pytest
from scipy import stats

from tests.sampling_reference import vllm_processed_logits
from xla_inference.sampling.draft_host import build_draft_batch, build_draft_extras
from xla_inference.sampling.host import SamplingOptions, build_sampling_batch
from xla_inference.sampling.rejection import (DraftBatch, process_draft_rows, rejection_core,
                                              rejection_sample)
from xla_inference.sampling.sampler import sample

V, K = 16, 4
_rejection_sample = jax.jit(rejection_sample)
_rejection_core = jax.jit(rejection_core)
_sample = jax.jit(sample, static_argnums=4)


# ---- the numpy port of vLLM's rules -------------------------------------------------------

def vllm_top_k_top_p(x, top_k, top_p):
    """vLLM's apply_top_k_top_p on one row: ascending sort, drop below the k-th largest,
    then drop the smallest while their cumulative probability is <= 1 - top_p (never the
    largest)."""
    x = x.copy()
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    if 0 < top_k < x.size:
        sorted_x[sorted_x < sorted_x[x.size - top_k]] = -np.inf
    if top_p < 1.0:
        p = np.exp(sorted_x - sorted_x.max())
        p /= p.sum()
        drop = np.cumsum(p) <= 1 - top_p
        drop[-1] = False
        sorted_x[drop] = -np.inf
    x[order] = sorted_x
    return x


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def vllm_rejection_reference(processed, drafts, draft_probs, opts, uniforms, inv_q, bonus):
    """Per request: greedy (argmax until the first mismatch, else the bonus) or random
    (accept iff q > 0 and p/q >= u; else the recovered argmax(max(p - q, 0) * inv_q), p with
    the draft zeroed when there is no q). -1 drafts are rejected."""
    out = []
    for b, ids in enumerate(drafts):
        o, emitted = opts[b], []
        if o.temperature == 0:
            for j, d in enumerate(ids):
                target = int(np.argmax(processed[b, j]))
                emitted.append(target)
                if d != target:
                    break
            else:
                emitted.append(int(bonus[b]))
            out.append(emitted)
            continue
        for j, d in enumerate(ids):
            x = processed[b, j].astype(np.float64) / o.temperature
            p = _softmax(vllm_top_k_top_p(x, o.top_k, o.top_p))
            if draft_probs is None:
                q_d, residual = 1.0, np.where(np.arange(V) == d, 0.0, p)
            else:
                q = draft_probs[b, j].astype(np.float64)
                q_d, residual = q[d], np.maximum(p - q, 0.0)
            if d >= 0 and q_d > 0 and p[d] / q_d >= uniforms[b, j]:
                emitted.append(int(d))
                continue
            emitted.append(int(np.argmax(residual * inv_q[b])))
            break
        else:
            emitted.append(int(bonus[b]))
        out.append(emitted)
    return out


# ---- tests ----------------------------------------------------------------------------------

def _emitted(result):
    tokens, num = np.asarray(result.tokens), np.asarray(result.num_emitted)
    assert np.all(tokens[np.arange(tokens.shape[1])[None, :] >= num[:, None]] == -1)
    return [list(map(int, row[:n])) for row, n in zip(tokens, num)]


def _case(seed, with_draft_probs):
    rng = np.random.default_rng(seed)
    opts = [SamplingOptions(), SamplingOptions(temperature=1.0),
            SamplingOptions(temperature=0.7, top_k=5), SamplingOptions(temperature=1.3, top_p=0.8),
            SamplingOptions(), SamplingOptions(temperature=0.9, top_k=8, top_p=0.9),
            SamplingOptions(temperature=1.0), SamplingOptions()]
    B = len(opts)
    logits = rng.normal(0, 2, (B, K + 1, V)).astype(np.float32)
    num = rng.integers(0, K + 1, B)
    drafts = []
    for b in range(B):
        argmax = np.argmax(logits[b, :K], axis=-1)
        # Mostly the target's argmax so greedy rows accept some, then anything, or -1.
        ids = [int(argmax[j]) if rng.random() < 0.7 else int(rng.integers(V))
               for j in range(num[b])]
        if num[b] and rng.random() < 0.2:
            ids[-1] = -1
        drafts.append(ids)
    probs = None
    if with_draft_probs:
        probs = rng.dirichlet(np.full(V, 0.5), (B, K)).astype(np.float32)
        probs[0, 0, :] = 0.0  # q(d) = 0 is rejected, never a division by zero
    uniforms = rng.uniform(1e-6, 1, (B, K)).astype(np.float32)
    inv_q = (1 / rng.exponential(1, (B, V))).astype(np.float32)
    bonus = rng.integers(0, V, B).astype(np.int32)
    return opts, logits, drafts, probs, uniforms, inv_q, bonus


def test_accept_recover_and_bonus_follow_vllms_rules_exactly():
    for seed in range(6):
        for with_probs in (False, True):
            opts, logits, drafts, probs, uniforms, inv_q, bonus = _case(seed, with_probs)
            batch = build_draft_batch(drafts, len(opts), K)
            batch = DraftBatch(batch.tokens, batch.num_drafts, probs)
            params = build_sampling_batch([(o, 0) for o in opts], len(opts))
            got = _emitted(_rejection_core(logits, batch, params, uniforms, inv_q, bonus))
            want = vllm_rejection_reference(logits, drafts, probs, opts, uniforms, inv_q, bonus)
            assert got == want, (seed, with_probs)


def test_all_greedy_batch_takes_argmaxes_as_vllms_rules():
    """A batch of greedy requests skips the random rules (rejection_sample's fast path): the
    same emitted tokens as the port, the bonus being row n's argmax."""
    greedy = SamplingOptions()
    for seed in range(6):
        _, logits, drafts, _, uniforms, inv_q, _ = _case(seed, False)
        opts = [greedy] * len(drafts)
        bonus = np.array([np.argmax(logits[b, len(d)]) for b, d in enumerate(drafts)])
        batch = build_draft_batch(drafts, len(opts), K)
        params = build_sampling_batch([(o, 0) for o in opts], len(opts))
        got = _emitted(_rejection_sample(logits, batch, params, None, jax.random.key(seed)))
        want = vllm_rejection_reference(logits, drafts, None, opts, uniforms, inv_q, bonus)
        assert got == want, seed
        assert any(len(w) > 1 for w in want) and any(len(w) < len(d) + 1
                                                     for w, d in zip(want, drafts))


def test_draft_rows_get_penalties_bad_words_min_tokens_allowed_ids_as_vllm():
    """Row j counts drafts[:j] as output (penalties, bad words) and j generated tokens for
    min_tokens; logit bias only on the bonus row, which counts the output alone for
    min_tokens (vLLM's ordinary sampler)."""
    rng = np.random.default_rng(3)
    opts = [
        SamplingOptions(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.4,
                        presence_penalty=0.3, logit_bias=((2, 1.5),)),
        SamplingOptions(bad_words=((5, 6), (9,)), min_tokens=3, stop_token_ids=(0, 1)),
        SamplingOptions(temperature=0.5, allowed_token_ids=(1, 3, 5, 7, 11, 12)),
        SamplingOptions(),
    ]
    prompts = [[1, 2, 3], [4], [5, 5], [6]]
    outputs = [[3, 7, 7], [2], [], [8]]
    drafts = [[7, 4, 4], [5, 6, 1, 2], [3], []]
    logits = rng.normal(0, 2, (4, K + 1, V)).astype(np.float32)
    extras = build_draft_extras(list(zip(opts, prompts, outputs, drafts)), 4, K, V)
    batch = build_draft_batch(drafts, 4, K)
    got = np.asarray(jax.jit(process_draft_rows)(logits, batch, extras))
    for b, o in enumerate(opts):
        n = len(drafts[b])
        for j in range(n + 1):
            bonus = j == n
            row_opts = dataclasses.replace(
                o, logit_bias=o.logit_bias if bonus else (),
                min_tokens=o.min_tokens + n if bonus else o.min_tokens)
            want = vllm_processed_logits(logits[b, j], row_opts, prompts[b],
                                         outputs[b] + drafts[b][:j])
            np.testing.assert_allclose(got[b, j], want, rtol=1e-5, atol=1e-5)


def _first_token_frequencies(logits, drafts, probs, opts, num_draws):
    params = build_sampling_batch([(opts, 0)] * num_draws, num_draws)
    batch = build_draft_batch(drafts, num_draws, K)
    batch = DraftBatch(batch.tokens, batch.num_drafts, probs)
    out = _rejection_sample(np.broadcast_to(logits, (num_draws, K + 1, V)), batch, params,
                            None, jax.random.key(7))
    first = np.asarray(out.tokens)[:, 0]
    return np.bincount(first, minlength=V), np.asarray(out.num_emitted)


def _chi_square_p_value(counts, expected_probs):
    keep = expected_probs > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    return stats.chisquare(counts[keep], expected_probs[keep] * counts.sum()).pvalue


@pytest.mark.slow  # ~20 s: compiles for 8000 rows
def test_first_token_is_distributed_as_the_target_with_ngram_drafts():
    """q = 1 (n-gram): whatever the drafts, the first emitted token follows p."""
    rng = np.random.default_rng(11)
    logits = rng.normal(0, 1.5, (K + 1, V)).astype(np.float32)
    opts = SamplingOptions(temperature=0.8, top_k=10)
    p = _softmax(vllm_top_k_top_p(logits[0].astype(np.float64) / 0.8, 10, 1.0))
    likely = int(np.argmax(p))
    n = 8000
    counts, emitted = _first_token_frequencies(logits, [[likely, 3, 3, 1]] * n, None, opts, n)
    assert _chi_square_p_value(counts, p) > 1e-3
    assert emitted.max() > 1  # some drafts accepted


def test_first_token_is_distributed_as_the_target_with_draft_probabilities():
    """Drafts drawn from q, accepted with min(1, p/q), recovered from max(p - q, 0): p."""
    rng = np.random.default_rng(12)
    logits = rng.normal(0, 1.5, (K + 1, V)).astype(np.float32)
    q = rng.dirichlet(np.full(V, 1.0), K).astype(np.float32)
    opts = SamplingOptions(temperature=1.0, top_p=0.9)
    p = _softmax(vllm_top_k_top_p(logits[0].astype(np.float64), 0, 0.9))
    n = 8000
    cdf = np.cumsum(q / q.sum(axis=-1, keepdims=True), axis=-1)  # [K, V]
    drafts = np.minimum((rng.random((n, K, 1)) > cdf[None]).sum(-1), V - 1).tolist()
    counts, _ = _first_token_frequencies(logits, drafts, np.broadcast_to(q, (n, K, V)), opts, n)
    assert _chi_square_p_value(counts, p) > 1e-3


@pytest.mark.slow  # ~30 s: three programs
def test_seeded_requests_repeat_alone_or_in_any_batch_and_zero_drafts_draw_as_sample():
    rng = np.random.default_rng(5)
    seeded = SamplingOptions(temperature=1.0, seed=1234)
    logits = rng.normal(0, 1, (K + 1, V)).astype(np.float32)
    drafts = [3, 9, 1]

    def run(rows, row_logits, row_drafts, key):
        params = build_sampling_batch(rows, len(rows))
        out = _rejection_sample(np.stack(row_logits), build_draft_batch(row_drafts, len(rows), K),
                                params, None, key)
        return _emitted(out)

    alone = run([(seeded, 4)], [logits], [drafts], jax.random.key(0))
    others = [rng.normal(0, 1, (K + 1, V)).astype(np.float32) for _ in range(3)]
    crowd = run([(SamplingOptions(temperature=1.0), 0), (SamplingOptions(), 2), (seeded, 4),
                 (SamplingOptions(temperature=0.5, seed=9), 1)],
                [others[0], others[1], logits, others[2]], [[1, 2], [], drafts, [4, 4, 4, 4]],
                jax.random.key(99))
    assert crowd[2] == alone[0]
    # With no drafts the bonus row is the ordinary sampler's draw, same seed and position.
    params = build_sampling_batch([(seeded, 4)], 1)
    plain = _sample(logits[:1], params, None, jax.random.key(0), 1)
    assert run([(seeded, 4)], [logits], [[]], jax.random.key(0))[0] == [int(plain.tokens[0])]


def test_a_missing_draft_recovers_from_the_whole_target_distribution():
    """A -1 draft (none proposed, or cut by a grammar) with no draft probabilities: the
    recovered token is drawn from p whole, token 0 included (vLLM's rule: the residual zeroes
    only the draft's own token, and -1 is none)."""
    logits = np.full((1, K + 1, V), -30.0, np.float32)
    logits[0, :, 0] = 30.0  # the target puts all its mass on token 0
    drafts = [[-1]]
    batch = build_draft_batch(drafts, 1, K)
    opts = [SamplingOptions(temperature=1.0)]
    params = build_sampling_batch([(o, 0) for o in opts], 1)
    uniforms = np.full((1, K), 0.5, np.float32)
    inv_q = np.ones((1, V), np.float32)
    bonus = np.array([3], np.int32)
    got = _emitted(_rejection_core(logits, batch, params, uniforms, inv_q, bonus))
    assert got == [[0]] == vllm_rejection_reference(logits, drafts, None, opts, uniforms, inv_q,
                                                    bonus)
