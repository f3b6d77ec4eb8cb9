"""Host side of sampling: each request's options, and the padded arrays a step samples with.

The common case (temperature, top-k/p, min-p, seeds) fits in a few [B] arrays. Whatever
needs a full [B, V] row (grammar masks, allowed tokens, bad words, min_tokens, logit bias,
penalties) goes into SamplingExtras, which is built only for steps with such a request.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xla_inference.sampling.types import (GREEDY_EPS, MAX_LOGPROB_TOKEN_IDS, SamplingBatch,
                                          SamplingExtras, greedy_sampling_batch,
                                          neutral_sampling_extras)

_MASK32 = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """One request's sampling parameters, already normalised (greedy = temperature 0)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[tuple[int, ...], ...] = ()
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()  # banned until min_tokens are generated (EOS included)
    num_logprobs: int | None = None  # top logprobs per sampled token; -1 = the whole vocabulary
    num_prompt_logprobs: int | None = None  # the same per prompt token
    # Instead of the top ones: the logprobs of these ids (vLLM's logprob_token_ids).
    logprob_token_ids: tuple[int, ...] | None = None

    @property
    def greedy(self) -> bool:
        """Whether the sampler takes the row's argmax (its greedy rows)."""
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def has_static_adjustment(self) -> bool:
        return bool(self.logit_bias) or self.allowed_token_ids is not None

    @property
    def wants_logprobs(self) -> bool:
        return self.num_logprobs is not None or self.logprob_token_ids is not None

    def num_top_logprobs(self, vocab_size: int) -> int | None:
        """Top logprobs the sampler must compute for this request: None for none (its ids
        replace them, as vLLM's sampler does), V for -1."""
        if self.logprob_token_ids is not None or self.num_logprobs is None:
            return None
        return vocab_size if self.num_logprobs == -1 else min(self.num_logprobs, vocab_size)

    def num_top_prompt_logprobs(self, vocab_size: int) -> int | None:
        n = self.num_prompt_logprobs
        return None if n is None else vocab_size if n == -1 else min(n, vocab_size)

    def needs_extras(self, num_output_tokens: int) -> bool:
        return (self.has_penalties or self.has_static_adjustment or bool(self.bad_words)
                or (num_output_tokens < self.min_tokens and bool(self.stop_token_ids)))


def build_sampling_batch(rows: list[tuple[SamplingOptions, int]], num_seqs: int) -> SamplingBatch:
    """rows: (options, tokens generated so far) per request, in batch order."""
    batch = greedy_sampling_batch(num_seqs)
    for row, (opts, num_generated) in enumerate(rows):
        batch.temperature[row] = opts.temperature
        batch.top_k[row] = opts.top_k
        batch.top_p[row] = opts.top_p
        batch.min_p[row] = opts.min_p
        if opts.seed is not None:
            batch.seeded[row] = True
            batch.seed[row] = (opts.seed & _MASK32, (opts.seed >> 32) & _MASK32)
            batch.seed_offset[row] = num_generated
        if opts.logprob_token_ids is not None:
            ids = opts.logprob_token_ids
            if len(ids) > MAX_LOGPROB_TOKEN_IDS:
                raise ValueError(f"logprob_token_ids holds {len(ids)} ids; at most "
                                 f"{MAX_LOGPROB_TOKEN_IDS} are served")
            batch.wanted_token_ids[row, :len(ids)] = ids
    batch.want_logprobs = np.asarray(any(o.wants_logprobs for o, _ in rows))
    return batch


def build_sampling_extras(rows: list[tuple[SamplingOptions, list[int], list[int]]],
                          num_seqs: int, vocab_size: int,
                          grammar_masks: dict[int, np.ndarray] | None = None
                          ) -> SamplingExtras | None:
    """rows: (options, prompt ids, output ids) per request; grammar_masks: row -> [V] bool
    of allowed tokens. None when no row needs anything beyond SamplingBatch."""
    # Token ids past the model's vocabulary (a tokenizer larger than the embedding) are
    # dropped here rather than indexing out of range and taking the engine down.
    in_vocab = lambda ids: [t for t in ids if 0 <= t < vocab_size]  # noqa: E731
    grammar_masks = grammar_masks or {}
    if not grammar_masks and not any(o.needs_extras(len(out)) for o, _, out in rows):
        return None
    extras = neutral_sampling_extras(num_seqs, vocab_size)
    for row, (opts, prompt, output) in enumerate(rows):
        adjust = extras.logit_adjust[row]
        if row in grammar_masks:
            extras.grammar_allowed[row] = grammar_masks[row]
        if opts.allowed_token_ids is not None:
            banned = np.ones(vocab_size, bool)
            banned[in_vocab(opts.allowed_token_ids)] = False
            adjust[banned] = -np.inf
        adjust[in_vocab(banned_bad_words(opts.bad_words, output))] = -np.inf
        if len(output) < opts.min_tokens:
            adjust[in_vocab(opts.stop_token_ids)] = -np.inf
        for token, bias in opts.logit_bias:
            if 0 <= token < vocab_size:
                adjust[token] += bias
        if opts.has_penalties:
            np.add.at(extras.output_counts[row], np.asarray(output, np.int64), 1.0)
            extras.prompt_mask[row, np.asarray(prompt, np.int64)] = True
            extras.presence_penalty[row] = opts.presence_penalty
            extras.frequency_penalty[row] = opts.frequency_penalty
            extras.repetition_penalty[row] = opts.repetition_penalty
    return extras


def logprobs_rows(options: list[SamplingOptions], out, vocab_size: int):
    """Each row's logprobs as vLLM's sampler lays them out: the sampled token first, then its
    top n (or its logprob_token_ids, in their order), padded to the widest row with id 0 and
    -inf. out: the sampler's SampleOutput as numpy, one row per option. -> (ids [B, w],
    logprobs [B, w], ranks [B]), or None when no row asked for logprobs."""
    widths = [len(o.logprob_token_ids) if o.logprob_token_ids is not None
              else o.num_top_logprobs(vocab_size) for o in options if o.wants_logprobs]
    if not widths:
        return None
    width = max(widths) + 1
    if all(o.logprob_token_ids is None for o in options):
        return out.logprob_token_ids[:, :width], out.logprobs[:, :width], out.ranks
    ids = np.zeros((len(options), width), np.int32)
    logprobs = np.full((len(options), width), -np.inf, np.float32)
    top = min(width, out.logprobs.shape[1])
    ids[:, :top], logprobs[:, :top] = out.logprob_token_ids[:, :top], out.logprobs[:, :top]
    for row, opts in enumerate(options):
        wanted = opts.logprob_token_ids
        if wanted is not None:
            ids[row, 1:1 + len(wanted)] = wanted
            ids[row, 1 + len(wanted):] = 0
            logprobs[row, 1:1 + len(wanted)] = out.wanted_logprobs[row, :len(wanted)]
            logprobs[row, 1 + len(wanted):] = -np.inf
    return ids, logprobs, out.ranks


def banned_bad_words(bad_words: tuple[tuple[int, ...], ...], output: list[int]) -> list[int]:
    """The last token of every bad word whose other tokens end the output so far."""
    banned = []
    for word in bad_words:
        prefix = list(word[:-1])
        if len(prefix) > len(output):
            continue
        if not prefix or output[len(output) - len(prefix):] == prefix:
            banned.append(word[-1])
    return banned


def unpack_grammar_bitmask(words: np.ndarray, vocab_size: int) -> np.ndarray:
    """int32 [W] bitmask (token t is bit t%32 of word t//32, 1 = allowed) -> bool [V].

    Tokens past the bitmask's width (model vocab padding) are banned."""
    bits = np.unpackbits(np.ascontiguousarray(words, dtype="<i4").view(np.uint8),
                         bitorder="little").astype(bool)
    allowed = np.zeros(vocab_size, bool)
    n = min(vocab_size, bits.shape[0])
    allowed[:n] = bits[:n]
    return allowed
