"""Speculative decoding's rejection sampling on device, by vLLM 0.32's rules
(vllm/v1/sample/rejection_sampler.py), for a batch of B requests with up to K drafts each.

Each request has K + 1 logit rows: row j < n verifies draft j (n = the request's number of
drafts), row n gives the bonus token. What a request emits:
- greedy (temperature 0): the target's argmax row by row until the first row whose argmax
  differs from the draft (that argmax is emitted, then stop); all drafts match -> the bonus;
- random: draft d at row j is accepted iff p(d) / q(d) >= u, u ~ U(0, 1) per draft, p the
  target's distribution after temperature, top-k and top-p (not min-p), q the drafter's
  (q = 1 for drafters without probabilities: n-gram); a draft of -1 (async scheduling's
  placeholder) is rejected. At the first rejection the request emits a recovered token,
  argmax(r / E) with r = max(p - q, 0) (or p with d's entry zeroed when q = 1) and
  E ~ Exp(1), one vector per request (a draw from r normalised); else the bonus, drawn by
  the ordinary sampler (min-p included) from the last row.
Draft rows get the penalties counting the earlier drafts as output, and the host-built
additive adjustment (allowed ids, bad words completed by earlier drafts, min_tokens by
position, grammar; not logit bias), as vLLM does; the bonus row counts every draft.

u is float32 drawn from (tiny, 1) rather than vLLM's float64 [0, 1): either way a draft
the target gives probability 0 is never accepted.
"""

import dataclasses

import jax
import jax.numpy as jnp

from xla_inference.sampling.sampler import (_apply_min_p, _row_keys,
                                            apply_extras, row_argmax, truncate_where_asked)
from xla_inference.sampling.types import GREEDY_EPS, SamplingBatch, SamplingExtras

# Tags folded into a row's key so the draws of one step never share a stream.
_UNIFORM_STREAM, _EXPONENTIAL_STREAM = 0x5EC0, 0x5EC1


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftBatch:
    """The drafts to verify, padded to K per request."""

    tokens: jax.Array  # [B, K] int32, -1 where there is no draft
    num_drafts: jax.Array  # [B] int32, n <= K
    probs: jax.Array | None = None  # [B, K, V] float32, the drafter's q; None: q = 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftExtras:
    """Per-row logit processing for the K + 1 rows of each request."""

    logit_adjust: jax.Array  # [B, K+1, V] float32, additive per row, built on the host
    output_counts: jax.Array  # [B, V] float32, tokens generated before this step
    prompt_mask: jax.Array  # [B, V] bool
    presence_penalty: jax.Array  # [B] float32
    frequency_penalty: jax.Array  # [B] float32
    repetition_penalty: jax.Array  # [B] float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RejectionOutput:
    tokens: jax.Array  # [B, K+1] int32, the emitted tokens, then -1
    num_emitted: jax.Array  # [B] int32, accepted drafts + 1


def rejection_sample(logits: jax.Array, drafts: DraftBatch, params: SamplingBatch,
                     extras: DraftExtras | None, step_key: jax.Array) -> RejectionOutput:
    """logits [B, K+1, V] -> the tokens each request emits this step. A batch of greedy
    requests only takes argmaxes: the random rules' sort (top-k/top-p) and [B, V] draws
    cost a CPU step many times a batch-1 forward (benchmarks/RESULTS.md, issue 23)."""
    processed = process_draft_rows(logits, drafts, extras)

    def random_rules():
        uniforms, inv_exponentials = _draws(params, step_key, drafts.tokens.shape[1],
                                            logits.shape[-1])
        bonus = _bonus_tokens(processed, drafts.num_drafts, params, step_key)
        return rejection_core(processed, drafts, params, uniforms, inv_exponentials, bonus)

    return jax.lax.cond(jnp.all(params.temperature < GREEDY_EPS),
                        lambda: greedy_rejection(processed, drafts), random_rules)


def greedy_rejection(processed, drafts: DraftBatch) -> RejectionOutput:
    """Every request greedy: drafts accepted while they equal the target's argmax, then the
    argmax of the first row that differs, or of row n (the bonus) -- rejection_core's
    greedy rows."""
    rows = processed.shape[1]
    K = rows - 1
    argmax = row_argmax(processed)  # [B, K+1]
    accept = (drafts.tokens == argmax[:, :K]) & (jnp.arange(K)[None, :] <
                                                 drafts.num_drafts[:, None])
    num_accepted = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=-1), axis=-1)
    last = jnp.take_along_axis(argmax, num_accepted[:, None], axis=-1)
    position = jnp.arange(rows)[None, :]
    padded_draft = jnp.pad(drafts.tokens, ((0, 0), (0, 1)))
    tokens = jnp.where(position < num_accepted[:, None], padded_draft,
                       jnp.where(position == num_accepted[:, None], last, -1))
    return RejectionOutput(tokens.astype(jnp.int32), (num_accepted + 1).astype(jnp.int32))


def process_draft_rows(logits, drafts: DraftBatch, extras: DraftExtras | None):
    """The additive adjustment and the penalties, row j counting drafts 0..j-1 as output."""
    logits = logits.astype(jnp.float32)
    if extras is None:
        return logits
    B, rows, V = logits.shape
    K = rows - 1
    earlier = jnp.arange(K)[None, :] < jnp.arange(rows)[:, None]  # [K+1, K]: row j sees d<j
    valid = (drafts.tokens >= 0) & (jnp.arange(K)[None, :] < drafts.num_drafts[:, None])
    one_hot = jax.nn.one_hot(jnp.where(valid, drafts.tokens, 0), V) * valid[..., None]
    counts = extras.output_counts[:, None, :] + jnp.einsum("jk,bkv->bjv", earlier, one_hot)

    def per_request(x):
        return jnp.repeat(x, rows, axis=0)

    flat = SamplingExtras(
        grammar_allowed=None,  # (the draft rows' grammar is in logit_adjust)
        logit_adjust=extras.logit_adjust.reshape(B * rows, V),
        output_counts=counts.reshape(B * rows, V),
        prompt_mask=per_request(extras.prompt_mask),
        presence_penalty=per_request(extras.presence_penalty),
        frequency_penalty=per_request(extras.frequency_penalty),
        repetition_penalty=per_request(extras.repetition_penalty),
    )
    return apply_extras(logits.reshape(B * rows, V), flat).reshape(B, rows, V)


def target_probs(processed, params: SamplingBatch):
    """p for the draft rows [B, K, V]: temperature (greedy rows 1), top-k, top-p; no min-p."""
    B, rows, V = processed.shape
    temperature = jnp.where(params.temperature < GREEDY_EPS, 1.0, params.temperature)
    scaled = processed[:, :-1, :] / temperature[:, None, None]
    K = rows - 1
    flat = truncate_where_asked(scaled.reshape(B * K, V), jnp.repeat(params.top_k, K),
                           jnp.repeat(params.top_p, K))
    return jax.nn.softmax(flat, axis=-1).reshape(B, K, V)


def rejection_core(processed, drafts: DraftBatch, params: SamplingBatch, uniforms,
                   inv_exponentials, bonus) -> RejectionOutput:
    """The accept/recover/bonus rules with the randomness given: uniforms [B, K],
    inv_exponentials [B, V] (1 / E), bonus [B]."""
    B, rows, V = processed.shape
    K = rows - 1
    draft = drafts.tokens
    safe_draft = jnp.maximum(draft, 0)
    target_argmax = row_argmax(processed[:, :-1, :])
    p = target_probs(processed, params)
    p_draft = jnp.take_along_axis(p, safe_draft[..., None], axis=-1)[..., 0]
    if drafts.probs is None:
        q_draft = jnp.ones_like(p_draft)
        # A -1 draft (none proposed, or cut by a grammar) matches no token: its recovered
        # token comes from p whole (safe_draft would zero token 0's share).
        residual = jnp.where(jnp.arange(V) == draft[..., None], 0.0, p)
    else:
        q_draft = jnp.take_along_axis(drafts.probs, safe_draft[..., None], axis=-1)[..., 0]
        residual = jnp.maximum(p - drafts.probs, 0.0)
    random_accept = (draft >= 0) & (q_draft > 0) & (p_draft / q_draft >= uniforms)
    recovered = row_argmax(residual * inv_exponentials[:, None, :])
    is_greedy = (params.temperature < GREEDY_EPS)[:, None]
    accept = jnp.where(is_greedy, draft == target_argmax, random_accept)
    accept &= jnp.arange(K)[None, :] < drafts.num_drafts[:, None]
    num_accepted = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=-1), axis=-1)
    correction = jnp.where(is_greedy, target_argmax, recovered)  # [B, K]
    position = jnp.arange(rows)[None, :]
    at_stop = jnp.take_along_axis(jnp.pad(correction, ((0, 0), (0, 1))),
                                  num_accepted[:, None], axis=-1)[:, 0]
    last = jnp.where(num_accepted < drafts.num_drafts, at_stop, bonus)
    padded_draft = jnp.pad(draft, ((0, 0), (0, 1)))
    tokens = jnp.where(position < num_accepted[:, None], padded_draft,
                       jnp.where(position == num_accepted[:, None], last[:, None], -1))
    return RejectionOutput(tokens.astype(jnp.int32), (num_accepted + 1).astype(jnp.int32))


def _bonus_tokens(processed, num_drafts, params: SamplingBatch, step_key):
    """The ordinary sampler on row n of each request, keyed as the token it would be without
    speculation (seed, tokens generated before it), so n = 0 draws what sample() draws."""
    row = jnp.take_along_axis(processed, num_drafts[:, None, None], axis=1)[:, 0, :]
    greedy = row_argmax(row)
    temperature = jnp.where(params.temperature < GREEDY_EPS, 1.0, params.temperature)
    scaled = _apply_min_p(row / temperature[:, None], params.min_p)
    scaled = truncate_where_asked(scaled, params.top_k, params.top_p)
    keys = _row_keys(dataclasses.replace(params, seed_offset=params.seed_offset + num_drafts),
                     step_key)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, scaled.shape[-1:], jnp.float32))(keys)
    drawn = row_argmax(scaled + gumbel)
    return jnp.where(params.temperature < GREEDY_EPS, greedy, drawn)


def _draws(params: SamplingBatch, step_key, K: int, V: int):
    """uniforms [B, K] in (tiny, 1) and 1/E [B, V], E ~ Exp(1), from each row's own stream
    (its seed and generated-token count when seeded), so seeded requests are reproducible
    and independent of the batch."""
    keys = _row_keys(params, step_key)
    tiny = jnp.finfo(jnp.float32).tiny

    def per_row(key):
        u = jax.random.uniform(jax.random.fold_in(key, _UNIFORM_STREAM), (K,), jnp.float32,
                               minval=tiny, maxval=1.0)
        e = jax.random.exponential(jax.random.fold_in(key, _EXPONENTIAL_STREAM), (V,),
                                   jnp.float32)
        return u, 1.0 / jnp.maximum(e, tiny)  # E = 0 would make 0 * inf a NaN

    return jax.vmap(per_row)(keys)
