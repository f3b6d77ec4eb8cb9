"""Host side of rejection sampling: the per-row additive adjustment of a request's K + 1
rows (sampling/rejection.py), built as vLLM's rejection sampler adjusts draft rows."""

from __future__ import annotations

import numpy as np

from xla_inference.sampling.host import SamplingOptions, banned_bad_words
from xla_inference.sampling.rejection import DraftBatch, DraftExtras


def build_draft_batch(drafts: list[list[int]], num_seqs: int, max_drafts: int) -> DraftBatch:
    """drafts: each request's draft tokens (-1 for async scheduling's placeholders)."""
    tokens = np.full((num_seqs, max_drafts), -1, np.int32)
    num = np.zeros(num_seqs, np.int32)
    for row, ids in enumerate(drafts):
        if len(ids) > max_drafts:
            raise ValueError(f"{len(ids)} draft tokens for one request; at most {max_drafts}")
        tokens[row, :len(ids)] = ids
        num[row] = len(ids)
    return DraftBatch(tokens, num)


def draft_rows_need_extras(opts: SamplingOptions, num_output_tokens: int) -> bool:
    return opts.needs_extras(num_output_tokens)


def build_draft_extras(rows: list[tuple[SamplingOptions, list[int], list[int], list[int]]],
                       num_seqs: int, max_drafts: int, vocab_size: int,
                       grammar_masks: dict[tuple[int, int], np.ndarray] | None = None
                       ) -> DraftExtras | None:
    """rows: (options, prompt ids, output ids, draft ids) per request; grammar_masks:
    (row, position) -> [V] bool of allowed tokens. Row j of request b (j <= n, n its
    drafts) sees output + drafts[:j]: bad words completed by them; stop tokens banned while
    fewer than min_tokens (draft row j counting j drafts, the bonus row none, as vLLM);
    allowed ids everywhere; logit bias only on the bonus row j = n (vLLM's rejection
    sampler leaves it out of draft rows). None when nothing applies."""
    grammar_masks = grammar_masks or {}
    if not grammar_masks and not any(draft_rows_need_extras(o, len(out)) for o, _, out, _ in rows):
        return None
    in_vocab = lambda ids: [t for t in ids if 0 <= t < vocab_size]  # noqa: E731
    rows_per_request = max_drafts + 1
    adjust = np.zeros((num_seqs, rows_per_request, vocab_size), np.float32)
    counts = np.zeros((num_seqs, vocab_size), np.float32)
    prompt_mask = np.zeros((num_seqs, vocab_size), bool)
    presence, frequency = np.zeros(num_seqs, np.float32), np.zeros(num_seqs, np.float32)
    repetition = np.ones(num_seqs, np.float32)
    for b, (opts, prompt, output, drafts) in enumerate(rows):
        for j in range(len(drafts) + 1):
            row = adjust[b, j]
            if (b, j) in grammar_masks:
                row[~grammar_masks[b, j]] = -np.inf
            if opts.allowed_token_ids is not None:
                banned = np.ones(vocab_size, bool)
                banned[in_vocab(opts.allowed_token_ids)] = False
                row[banned] = -np.inf
            seen = list(output) + [t for t in drafts[:j] if t >= 0]
            row[in_vocab(banned_bad_words(opts.bad_words, seen))] = -np.inf
            # Draft rows by position; the bonus row as vLLM's ordinary sampler sees it,
            # counting only the output before this step.
            generated = len(output) + (j if j < len(drafts) else 0)
            if generated < opts.min_tokens:
                row[in_vocab(opts.stop_token_ids)] = -np.inf
            if j == len(drafts):
                for token, bias in opts.logit_bias:
                    if 0 <= token < vocab_size:
                        row[token] += bias
        if opts.has_penalties:
            np.add.at(counts[b], np.asarray(output, np.int64), 1.0)
            prompt_mask[b, np.asarray(prompt, np.int64)] = True
            presence[b], frequency[b] = opts.presence_penalty, opts.frequency_penalty
            repetition[b] = opts.repetition_penalty
    return DraftExtras(adjust, counts, prompt_mask, presence, frequency, repetition)
