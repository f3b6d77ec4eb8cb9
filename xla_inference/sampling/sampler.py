"""Token sampling on device, per request in one batch, in vLLM's order of operations.

1. logprobs (when asked for) come from the raw logits, a structured output's grammar mask
   applied (vLLM's runner masks the logits before its sampler takes them): the sampled
   token's, the top k (k = V in the whole-vocabulary variant) and those of each row's
   wanted token ids;
2. extras: the additive adjustment (allowed tokens, bad words, min_tokens, logit bias),
   then the repetition, frequency and presence penalties;
3. greedy rows take the argmax here;
4. the other rows: temperature, min-p, top-k, top-p, then a Gumbel-max draw whose noise
   comes from the row's own seed when it has one, so a seeded request draws the same tokens
   whatever else shares the batch.
"""

import jax
import jax.numpy as jnp

from xla_inference.kernels import cpu_argmax
from xla_inference.sampling.types import GREEDY_EPS, SampleOutput, SamplingBatch, SamplingExtras



def sample(logits: jax.Array, params: SamplingBatch, extras: SamplingExtras | None,
           step_key: jax.Array, num_logprobs: int) -> SampleOutput:
    """logits [B, V] float32 -> SampleOutput with `num_logprobs` top logprobs per row (a
    static width: V for the whole-vocabulary variant)."""
    raw = logits
    if extras is not None:
        raw = mask_grammar(logits, extras)
        logits = _adjust_and_penalize(raw, extras)
    greedy_tokens = row_argmax(logits)
    is_greedy = params.temperature < GREEDY_EPS
    tokens = jax.lax.cond(
        jnp.all(is_greedy),
        lambda: greedy_tokens,
        lambda: jnp.where(is_greedy, greedy_tokens, _random_sample(logits, params, step_key)),
    )
    ids, logprobs, ranks, wanted = jax.lax.cond(
        params.want_logprobs,
        lambda: _all_logprobs(raw, tokens, num_logprobs, params.wanted_token_ids),
        lambda: _no_logprobs(tokens, num_logprobs, params.wanted_token_ids.shape[1]),
    )
    return SampleOutput(tokens, ids, logprobs, ranks, wanted)


_ARGMAX_CHUNK = 128


def row_argmax(logits):
    """jnp.argmax over the last axis [..., V] -> [...] int32, same result (the first maximum;
    NaN counts as the maximum) in two steps: each 128-wide chunk's max (a plain reduction,
    vectorized), the first chunk holding the row's max (or its first NaN), then the argmax
    inside that chunk.
    XLA's CPU backend lowers argmax (a reduction over value and index pairs) to scalar code:
    ~9 ms over [64, 49152] float32 on two cores, against < 1 ms for this. On the host CPU
    the native kernel (kernels/cpu_argmax.py) in place of both: one row of 49152 in a few
    microseconds, against ~210 us for this."""
    V = logits.shape[-1]
    if logits.ndim != 2:
        return row_argmax(logits.reshape(-1, V)).reshape(logits.shape[:-1])
    if _native_argmax(logits):
        return cpu_argmax.row_argmax(logits)
    if V < 2 * _ARGMAX_CHUNK:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    B = logits.shape[0]
    pad = -V % _ARGMAX_CHUNK
    if pad:
        logits = jnp.pad(logits, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    chunks = logits.reshape(B, -1, _ARGMAX_CHUNK)
    # XLA's vectorized max may drop a NaN, so the first chunk holding one is found apart.
    nan_chunks = jnp.any(jnp.isnan(chunks), axis=-1)
    best_chunk = jnp.where(jnp.any(nan_chunks, axis=-1), jnp.argmax(nan_chunks, axis=-1),
                           jnp.argmax(jnp.max(chunks, axis=-1), axis=-1))
    inside = jnp.take_along_axis(chunks, best_chunk[:, None, None], axis=1)[:, 0]
    return (best_chunk * _ARGMAX_CHUNK + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def _native_argmax(logits) -> bool:
    """Whether row_argmax takes the native kernel: float32 rows on the host CPU. (Over a
    mesh of several devices XLA runs the custom call on whole rows on each device: it has
    no rule to split it. The sampler's logits are whole there already.)"""
    return (logits.dtype == jnp.float32 and jax.default_backend() == "cpu"
            and cpu_argmax.available())


def apply_extras(logits, extras: SamplingExtras):
    """The grammar mask, the additive adjustment, then vLLM's penalties."""
    return _adjust_and_penalize(mask_grammar(logits, extras), extras)


def mask_grammar(logits, extras: SamplingExtras):
    if extras.grammar_allowed is None:
        return logits
    return jnp.where(extras.grammar_allowed, logits, -jnp.inf)


def _adjust_and_penalize(logits, extras: SamplingExtras):
    """The additive adjustment, then vLLM's penalties (OpenAI's definition for two of them)."""
    logits = logits + extras.logit_adjust
    counts = extras.output_counts
    in_output = counts > 0
    rep = extras.repetition_penalty[:, None]
    seen = extras.prompt_mask | in_output
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return (logits - extras.frequency_penalty[:, None] * counts
            - extras.presence_penalty[:, None] * in_output)


def gather_logprobs(raw_logits, token_ids, num_logprobs: int):
    """([N, k+1] ids, [N, k+1] logprobs, [N] ranks): `token_ids` first, then the top k.

    k = V (whole-vocabulary logprobs) sorts the whole row: callers compile that variant
    apart, for the requests that ask for it."""
    return _top_logprobs(_log_softmax(raw_logits), token_ids, num_logprobs)


def _log_softmax(raw_logits):
    return jax.nn.log_softmax(raw_logits.astype(jnp.float32), axis=-1)


def _top_logprobs(logprobs, token_ids, num_logprobs: int):
    top_values, top_ids = jax.lax.top_k(logprobs, num_logprobs)
    chosen = jnp.take_along_axis(logprobs, token_ids[:, None], axis=-1)
    # vLLM's rank: how many tokens are at least as likely (ties share the worse rank).
    ranks = jnp.sum(logprobs >= chosen, axis=-1).astype(jnp.int32)
    ids = jnp.concatenate([token_ids[:, None], top_ids.astype(jnp.int32)], axis=-1)
    return ids, jnp.concatenate([chosen, top_values], axis=-1), ranks


def _all_logprobs(raw_logits, tokens, num_logprobs: int, wanted_ids):
    """gather_logprobs, and the logprobs at each row's wanted ids [B, W] (logprob_token_ids)."""
    logprobs = _log_softmax(raw_logits)
    wanted = jnp.take_along_axis(logprobs, wanted_ids, axis=-1)
    return (*_top_logprobs(logprobs, tokens, num_logprobs), wanted)


def _no_logprobs(tokens, num_logprobs: int, num_wanted: int):
    B = tokens.shape[0]
    return (jnp.zeros((B, num_logprobs + 1), jnp.int32),
            jnp.zeros((B, num_logprobs + 1), jnp.float32), jnp.zeros((B,), jnp.int32),
            jnp.zeros((B, num_wanted), jnp.float32))


def _random_sample(logits, params: SamplingBatch, step_key):
    temperature = jnp.where(params.temperature < GREEDY_EPS, 1.0, params.temperature)
    scaled = logits / temperature[:, None]
    scaled = _apply_min_p(scaled, params.min_p)
    scaled = truncate_where_asked(scaled, params.top_k, params.top_p)
    # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits).
    keys = _row_keys(params, step_key)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, scaled.shape[-1:], jnp.float32))(keys)
    return row_argmax(scaled + gumbel)


def _row_keys(params: SamplingBatch, step_key):
    """One key per row: from the request's seed and its token count, or from the step key."""
    rows = jnp.arange(params.temperature.shape[0])
    unseeded = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(rows)

    def seeded_key(seed, offset):
        key = jax.random.fold_in(jax.random.key(seed[0]), seed[1])
        return jax.random.fold_in(key, offset)

    seeded = jax.vmap(seeded_key)(params.seed, params.seed_offset)
    data = jnp.where(params.seeded[:, None], jax.random.key_data(seeded),
                     jax.random.key_data(unseeded))
    return jax.random.wrap_key_data(data)


def _apply_min_p(logits, min_p):
    """Drop tokens whose probability is below min_p times the most likely token's."""
    threshold = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(min_p)[:, None]
    return jnp.where((min_p[:, None] > 0) & (logits < threshold), -jnp.inf, logits)


def truncate_where_asked(logits, top_k, top_p):
    """Top-k/top-p only when some row asks for it: the sort is the costly part on a CPU."""
    needed = jnp.any((top_k > 0) | (top_p < 1.0))
    return jax.lax.cond(needed, _truncate_top_k_top_p, lambda x, *_: x, logits, top_k, top_p)


def _truncate_top_k_top_p(logits, top_k, top_p):
    """Mask (to -inf) tokens outside each row's top-k and its top-p nucleus."""
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    k = jnp.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)
    kth_value = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    # Nucleus: keep a sorted token while the probability mass before it is below top_p.
    probs = jax.nn.softmax(jnp.where(sorted_desc >= kth_value, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p[:, None]
    num_keep = jnp.maximum(keep_sorted.sum(axis=-1), 1)
    p_value = jnp.take_along_axis(sorted_desc, (num_keep - 1)[:, None], axis=-1)
    threshold = jnp.maximum(kth_value, p_value)
    return jnp.where(logits >= threshold, logits, -jnp.inf)
