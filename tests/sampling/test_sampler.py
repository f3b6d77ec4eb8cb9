"""The device sampler against exact distributions and plain-numpy versions of vLLM's rules."""

import jax
import numpy as np
import pytest
from scipy import stats

from tests.sampling_reference import vllm_processed_logits
from xla_inference.sampling.sampler import apply_extras, sample
from xla_inference.sampling.host import (SamplingOptions, build_sampling_batch,
                                           build_sampling_extras, unpack_grammar_bitmask)

V = 12
LOGITS = np.array([2.0, 1.5, 1.4, 1.0, 0.7, 0.5, 0.2, 0.0, -0.3, -0.8, -1.5, -2.5], np.float32)
NUM_DRAWS = 20000
_sample = jax.jit(sample, static_argnums=4)


def _expected_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """vLLM's rules in float64 numpy: temperature, min-p, top-k, top-p (on what is left)."""
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    keep = p >= min_p * p.max()
    order = np.argsort(-x, kind="stable")
    if top_k > 0:
        keep[order[top_k:]] = False
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    # top-p: drop the least likely tokens while their cumulative mass stays <= 1 - top_p.
    ascending = order[::-1]
    cumulative = np.cumsum(q[ascending])
    drop = cumulative <= 1 - top_p
    drop[-1] = False
    keep[ascending[drop]] = False
    q = np.where(keep, q, 0.0)
    return q / q.sum()


def _draw(options: SamplingOptions, logits=LOGITS, num=NUM_DRAWS, extras=None, step=0):
    batch = build_sampling_batch([(options, 0)] * num, num)
    out = _sample(
        np.tile(logits, (num, 1)), batch, extras, jax.random.fold_in(jax.random.key(1), step), 5)
    return np.asarray(out.tokens)


@pytest.mark.parametrize("params", [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=1.3, top_k=4),
    dict(temperature=1.0, top_p=0.7),
    dict(temperature=0.8, min_p=0.2),
    dict(temperature=1.2, top_k=6, top_p=0.8),
    dict(temperature=0.9, top_k=8, top_p=0.9, min_p=0.1),
])
def test_sampled_frequencies_match_the_exact_distribution(params):
    expected = _expected_probs(LOGITS, **params)
    counts = np.bincount(_draw(SamplingOptions(**params)), minlength=V)
    # Tokens the rules exclude must never appear.
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    chi2 = stats.chisquare(counts[support], NUM_DRAWS * expected[support])
    assert chi2.pvalue > 1e-3, (params, counts, expected)


def test_greedy_rows_take_the_argmax_beside_random_rows():
    batch = build_sampling_batch([(SamplingOptions(), 0), (SamplingOptions(temperature=1.0), 0)] * 50,
                                 100)
    logits = np.random.default_rng(0).normal(size=(100, V)).astype(np.float32)
    out = _sample(logits, batch, None, jax.random.key(0), 3)
    np.testing.assert_array_equal(np.asarray(out.tokens)[::2], logits[::2].argmax(-1))


def test_seeded_request_draws_the_same_tokens_alone_and_in_any_batch():
    seeded = SamplingOptions(temperature=1.0, seed=1234)
    others = SamplingOptions(temperature=1.0, top_p=0.9)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(17, 1000)).astype(np.float32) * 3
    alone, crowded = [], []
    for offset in range(20):
        single = build_sampling_batch([(seeded, offset)], 1)
        alone.append(int(_sample(logits[:1], single, None, jax.random.key(offset), 2).tokens[0]))
        rows = [(others, 0)] * 16
        rows.insert(5, (seeded, offset))
        mixed = build_sampling_batch(rows, 17)
        crowd_logits = logits.copy()
        crowd_logits[5] = logits[0]
        crowded.append(int(_sample(crowd_logits, mixed, None, jax.random.key(99 + offset), 2).tokens[5]))
    assert alone == crowded
    assert len(set(alone)) > 5  # really random draws, not a constant


def test_penalties_bias_bad_words_and_min_tokens_match_numpy():
    rng = np.random.default_rng(3)
    vocab = 50
    cases = [
        (SamplingOptions(presence_penalty=0.7, frequency_penalty=0.3, repetition_penalty=1.3),
         [1, 2, 3, 3], [3, 4, 4, 4, 9]),
        (SamplingOptions(repetition_penalty=0.8, logit_bias=((4, 5.0), (7, -2.0))), [7, 8], [1]),
        (SamplingOptions(bad_words=((9,), (4, 5), (1, 2, 6))), [0], [3, 1, 2]),
        (SamplingOptions(min_tokens=3, stop_token_ids=(2, 11)), [5], [6]),
        (SamplingOptions(allowed_token_ids=(1, 5, 30), frequency_penalty=-0.5), [], [5, 5]),
        (SamplingOptions(min_tokens=1, stop_token_ids=(2,)), [5], [6]),  # reached: no ban
        (SamplingOptions(temperature=1.0), [1], [2]),  # needs nothing
    ]
    logits = rng.normal(size=(len(cases), vocab)).astype(np.float32) * 2
    grammar = {2: rng.random(vocab) < 0.6}
    extras = build_sampling_extras([c for c in cases], len(cases), vocab, grammar)
    got = np.asarray(apply_extras(logits, extras))
    for row, (opts, prompt, output) in enumerate(cases):
        want = vllm_processed_logits(logits[row], opts, prompt, output, grammar.get(row))
        np.testing.assert_allclose(got[row], want, rtol=1e-6, atol=1e-6, err_msg=str(opts))


def test_extras_are_skipped_when_no_request_needs_them():
    rows = [(SamplingOptions(temperature=1.0, top_k=3), [1], [2]),
            (SamplingOptions(min_tokens=1, stop_token_ids=(2,)), [1], [2])]
    assert build_sampling_extras(rows, 4, 10) is None


def test_logprobs_are_the_raw_log_softmax_with_ranks():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 40)).astype(np.float32) * 3
    opts = [SamplingOptions(temperature=1.0, num_logprobs=5, presence_penalty=1.0)] * 6
    batch = build_sampling_batch([(o, 0) for o in opts], 6)
    extras = build_sampling_extras([(o, [], [1, 2]) for o in opts], 6, 40)
    out = jax.tree.map(np.asarray, _sample(logits, batch, extras, jax.random.key(0), 5))
    ref = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    for r in range(6):
        tok = out.tokens[r]
        assert out.logprob_token_ids[r, 0] == tok
        np.testing.assert_allclose(out.logprobs[r, 0], ref[r, tok], atol=1e-5)
        top = np.argsort(-ref[r])[:5]
        np.testing.assert_array_equal(out.logprob_token_ids[r, 1:], top)
        np.testing.assert_allclose(out.logprobs[r, 1:], ref[r, top], atol=1e-5)
        assert out.ranks[r] == 1 + np.sum(ref[r] > ref[r, tok])


def test_grammar_bitmask_unpacks_bit_t_of_word_t_div_32():
    allowed = np.zeros(70, bool)
    allowed[[0, 5, 31, 32, 33, 63, 64, 69]] = True
    words = np.zeros(3, np.uint32)
    for t in np.flatnonzero(allowed):
        words[t // 32] |= np.uint32(1 << (t % 32))
    got = unpack_grammar_bitmask(words.view(np.int32), 72)
    np.testing.assert_array_equal(got[:70], allowed)
    assert not got[70:].any()  # past the bitmask: model vocabulary padding stays banned


def test_token_ids_past_the_model_vocabulary_are_ignored_not_fatal():
    opts = SamplingOptions(logit_bias=((3, 1.0), (99, 5.0)), allowed_token_ids=(1, 3, 500),
                           bad_words=((77,),), min_tokens=2, stop_token_ids=(2, 1000))
    extras = build_sampling_extras([(opts, [1], [])], 1, 10)
    adjust = np.asarray(extras.logit_adjust[0])
    assert adjust[3] == 1.0 and adjust[1] == 0.0
    assert np.isneginf(adjust[[0, 2, 4, 5, 6, 7, 8, 9]]).all()
