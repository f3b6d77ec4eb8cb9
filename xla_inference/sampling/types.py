"""What the device sampler consumes and returns: per-row parameters, the optional [B, V]
extras, and the sampled tokens with their logprobs."""

import dataclasses

import jax
import numpy as np

# vLLM 0.32 caps SamplingParams.logprob_token_ids at 128 ids (MAX_LOGPROB_TOKEN_IDS, the row
# width of its own sampler): every step carries a [B, 128] id array, so one program serves
# any mix of requests.
MAX_LOGPROB_TOKEN_IDS = 128

# Temperatures below this are greedy: the sampler takes the row's argmax.
GREEDY_EPS = 1e-5


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    """Per-request sampling parameters, padded to B rows (padding rows are greedy)."""

    temperature: jax.Array  # [B] float32, 0 means greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32, 1 = off
    min_p: jax.Array  # [B] float32, 0 = off
    seeded: jax.Array  # [B] bool, the row draws from its own seed's stream
    seed: jax.Array  # [B, 2] uint32, low and high words of the request's seed
    seed_offset: jax.Array  # [B] int32, tokens the request has generated so far
    want_logprobs: jax.Array  # [] bool, some row asked for logprobs
    wanted_token_ids: jax.Array  # [B, MAX_LOGPROB_TOKEN_IDS] int32, logprob_token_ids (pad 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingExtras:
    """Per-row logit processing before sampling; built only for steps that need it."""

    # [B, V] bool, the tokens a structured output's grammar allows (all where none): applied
    # before anything else, logprobs included, as vLLM's runner masks the logits it hands
    # its sampler. None: no mask (a verify step's draft rows carry theirs in logit_adjust).
    grammar_allowed: jax.Array | None
    logit_adjust: jax.Array  # [B, V] float32, added after: bias, or -inf for a banned token
    output_counts: jax.Array  # [B, V] float32, how often each token was generated
    prompt_mask: jax.Array  # [B, V] bool, tokens present in the prompt
    presence_penalty: jax.Array  # [B] float32, 0 = off
    frequency_penalty: jax.Array  # [B] float32, 0 = off
    repetition_penalty: jax.Array  # [B] float32, 1 = off


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
    """What the sampler returns for each row; logprobs are zeros unless asked for."""

    tokens: jax.Array  # [B] int32
    logprob_token_ids: jax.Array  # [B, k+1] int32, the sampled token, then the top k
    logprobs: jax.Array  # [B, k+1] float32, log-softmax of the raw logits (k = V: all of them)
    ranks: jax.Array  # [B] int32, rank of the sampled token (1 = most likely)
    wanted_logprobs: jax.Array  # [B, MAX_LOGPROB_TOKEN_IDS] float32, at SamplingBatch's wanted ids


def greedy_sampling_batch(num_seqs: int) -> SamplingBatch:
    return SamplingBatch(
        temperature=np.zeros(num_seqs, np.float32),
        top_k=np.zeros(num_seqs, np.int32),
        top_p=np.ones(num_seqs, np.float32),
        min_p=np.zeros(num_seqs, np.float32),
        seeded=np.zeros(num_seqs, bool),
        seed=np.zeros((num_seqs, 2), np.uint32),
        seed_offset=np.zeros(num_seqs, np.int32),
        want_logprobs=np.asarray(False),
        wanted_token_ids=np.zeros((num_seqs, MAX_LOGPROB_TOKEN_IDS), np.int32),
    )


def neutral_sampling_extras(num_seqs: int, vocab_size: int) -> SamplingExtras:
    """Extras that change nothing: the starting point rows fill in."""
    return SamplingExtras(
        grammar_allowed=np.ones((num_seqs, vocab_size), bool),
        logit_adjust=np.zeros((num_seqs, vocab_size), np.float32),
        output_counts=np.zeros((num_seqs, vocab_size), np.float32),
        prompt_mask=np.zeros((num_seqs, vocab_size), bool),
        presence_penalty=np.zeros(num_seqs, np.float32),
        frequency_penalty=np.zeros(num_seqs, np.float32),
        repetition_penalty=np.ones(num_seqs, np.float32),
    )
