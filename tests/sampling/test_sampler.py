"""The device sampler against exact distributions and plain-numpy versions of vLLM's rules."""

import jax
import numpy as np
import pytest
from scipy import stats

from tests.sampling_reference import vllm_processed_logits
from xla_inference.sampling.sampler import apply_extras, gather_logprobs, row_argmax, sample
from xla_inference.sampling.host import (SamplingOptions, build_sampling_batch,
                                         build_sampling_extras, logprobs_rows,
                                         unpack_grammar_bitmask)
from xla_inference.sampling.types import MAX_LOGPROB_TOKEN_IDS

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


def test_logprobs_see_the_grammar_mask_and_nothing_after_it():
    """vLLM's runner masks the logits by the grammar before its sampler computes the raw
    logprobs; allowed ids, bias and penalties come after them. Row 0 has a grammar and a
    logit bias, row 1 a bias alone."""
    rng = np.random.default_rng(4)
    vocab = 30
    logits = rng.normal(size=(2, vocab)).astype(np.float32) * 2
    opts = [SamplingOptions(num_logprobs=4, logit_bias=((3, 4.0),)),
            SamplingOptions(num_logprobs=4, logit_bias=((5, -3.0),))]
    allowed = rng.random(vocab) < 0.5
    allowed[3] = True
    batch = build_sampling_batch([(o, 0) for o in opts], 2)
    extras = build_sampling_extras([(o, [], []) for o in opts], 2, vocab, {0: allowed})
    out = jax.tree.map(np.asarray, _sample(logits, batch, extras, jax.random.key(0), 4))
    masked = np.where(allowed, logits[0], -np.inf)
    for row, raw in enumerate([masked, logits[1]]):
        ref = _log_softmax64(raw)
        top = np.argsort(-ref, kind="stable")[:4]
        np.testing.assert_array_equal(out.logprob_token_ids[row, 1:], top)
        np.testing.assert_allclose(out.logprobs[row, 1:], ref[top], atol=1e-5)
        tok = out.tokens[row]
        np.testing.assert_allclose(out.logprobs[row, 0], ref[tok], atol=1e-5)
    assert allowed[out.tokens[0]] and allowed[out.logprob_token_ids[0]].all()
    processed = vllm_processed_logits(logits[0], opts[0], [], [], allowed)
    assert out.tokens[0] == np.argmax(processed)  # greedy over the biased, masked row


def _log_softmax64(logits):
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_whole_vocabulary_variant_returns_every_token_sorted():
    # logprobs=-1: the sampled token, then all V tokens from the most likely down.
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 40)).astype(np.float32) * 3
    opts = [SamplingOptions(temperature=1.0, num_logprobs=-1)] * 4 + [SamplingOptions()]
    batch = build_sampling_batch([(o, 0) for o in opts], 5)
    out = jax.tree.map(np.asarray, _sample(logits, batch, None, jax.random.key(3), 40))
    ref = _log_softmax64(logits)
    assert out.logprob_token_ids.shape == (5, 41)
    for r in range(5):
        tok = out.tokens[r]
        assert out.logprob_token_ids[r, 0] == tok
        np.testing.assert_array_equal(out.logprob_token_ids[r, 1:], np.argsort(-ref[r]))
        np.testing.assert_allclose(out.logprobs[r], ref[r, out.logprob_token_ids[r]], atol=1e-5)
        assert out.ranks[r] == 1 + np.sum(ref[r] > ref[r, tok])


def test_logprob_token_ids_are_gathered_per_row_beside_top_logprobs():
    rng = np.random.default_rng(4)
    V = 300
    logits = rng.normal(size=(4, V)).astype(np.float32) * 2
    wanted = tuple(rng.choice(V, size=MAX_LOGPROB_TOKEN_IDS, replace=False).tolist())
    opts = [SamplingOptions(logprob_token_ids=(7, 3, 7, 299)),  # repeats are kept, in order
            SamplingOptions(temperature=0.7, num_logprobs=2),
            SamplingOptions(temperature=1.0, logprob_token_ids=wanted),  # the widest vLLM allows
            SamplingOptions(temperature=1.0)]  # asks for nothing
    batch = build_sampling_batch([(o, 0) for o in opts], 4)
    out = jax.tree.map(np.asarray, _sample(logits, batch, None, jax.random.key(5), 4))
    ref = _log_softmax64(logits)
    np.testing.assert_allclose(out.wanted_logprobs[0, :4], ref[0, [7, 3, 7, 299]], atol=1e-5)
    np.testing.assert_allclose(out.wanted_logprobs[2], ref[2, list(wanted)], atol=1e-5)
    ids, logprobs, ranks = logprobs_rows(opts, out, V)
    # As wide as the widest request; each row laid out as vLLM's sampler lays it out.
    assert ids.shape == logprobs.shape == (4, MAX_LOGPROB_TOKEN_IDS + 1)
    assert ids[0, :5].tolist() == [out.tokens[0], 7, 3, 7, 299]
    assert np.isneginf(logprobs[0, 5:]).all() and not ids[0, 5:].any()
    top = np.argsort(-ref[1])[:2]
    assert ids[1, :3].tolist() == [out.tokens[1], *top]
    np.testing.assert_allclose(logprobs[1, :3], ref[1, ids[1, :3]], atol=1e-5)
    assert ids[2].tolist() == [out.tokens[2], *wanted]
    for r in range(3):
        np.testing.assert_allclose(logprobs[r, 0], ref[r, out.tokens[r]], atol=1e-5)
        assert ranks[r] == 1 + np.sum(ref[r] > ref[r, out.tokens[r]])


def test_logprobs_rows_is_none_without_requests_and_a_slice_without_token_ids():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    opts = [SamplingOptions(), SamplingOptions(num_logprobs=3), SamplingOptions(num_logprobs=0)]
    batch = build_sampling_batch([(o, 0) for o in opts], 3)
    out = jax.tree.map(np.asarray, _sample(logits, batch, None, jax.random.key(0), 5))
    ids, logprobs, _ = logprobs_rows(opts, out, 50)
    assert ids.shape == (3, 4)
    np.testing.assert_array_equal(ids, out.logprob_token_ids[:, :4])
    assert logprobs_rows([SamplingOptions()] * 3, out, 50) is None
    none_asked = build_sampling_batch([(SamplingOptions(), 0)] * 3, 3)
    quiet = _sample(logits, none_asked, None, jax.random.key(0), 5)
    assert not np.asarray(quiet.logprobs).any() and not np.asarray(quiet.wanted_logprobs).any()


def test_scorer_whole_vocabulary_width_is_every_token_with_the_target_first():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(6, 33)).astype(np.float32) * 4
    targets = rng.integers(0, 33, size=6).astype(np.int32)
    ids, logprobs, ranks = map(np.asarray, jax.jit(gather_logprobs, static_argnums=2)(
        logits, targets, 33))
    ref = _log_softmax64(logits)
    for r in range(6):
        assert ids[r, 0] == targets[r]
        assert sorted(ids[r, 1:].tolist()) == list(range(33))
        np.testing.assert_allclose(logprobs[r], ref[r, ids[r]], atol=1e-5)
        assert np.all(np.diff(logprobs[r, 1:]) <= 0)
        assert ranks[r] == np.sum(ref[r] >= ref[r, targets[r]])


def test_too_many_logprob_token_ids_are_refused():
    opts = SamplingOptions(logprob_token_ids=tuple(range(MAX_LOGPROB_TOKEN_IDS + 1)))
    with pytest.raises(ValueError, match="logprob_token_ids"):
        build_sampling_batch([(opts, 0)], 1)


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


@pytest.mark.parametrize("vocab", [300, 49152])
def test_row_argmax_is_numpys_first_maximum_with_ties_nan_and_masked_rows(vocab):
    """The chunked argmax against numpy's: random rows, ties across and inside chunks (the
    first wins), a NaN row (the first NaN), an all -inf row (index 0), a vocabulary that is
    not a multiple of the chunk (padded) and a maximum in the last, partial chunk."""
    x = np.random.default_rng(0).standard_normal((8, vocab)).astype(np.float32)
    x[1, [5, 200, vocab - 1]] = 9.0
    x[2, [130, 131]] = 9.0
    x[3, [40, 260]] = np.nan
    x[4] = -np.inf
    x[5, vocab - 1] = 9.0
    got = np.asarray(jax.jit(row_argmax)(x))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got[1] == 5 and got[2] == 130 and got[3] == 40 and got[4] == 0 and got[5] == vocab - 1
