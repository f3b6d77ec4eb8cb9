"""Verifying drafted tokens: the K + 1 logit rows of each request from a step's hidden
states, then rejection sampling (sampling/rejection.py), in one program per batch shape."""

import jax
import numpy as np

from xla_inference.models.interface import ModelFamily
from xla_inference.sampling.draft_host import build_draft_batch, build_draft_extras
from xla_inference.sampling.host import build_sampling_batch
from xla_inference.sampling.rejection import rejection_sample


def verify_program(model: ModelFamily, model_cfg):
    """jit of (params, hidden [T, D], rows [B*(K+1)], drafts, sampling, extras, key, step)."""

    def verify(params, hidden, rows, drafts, sampling, extras, base_key, step):
        B, K = drafts.tokens.shape
        logits = model.compute_logits(params, hidden[rows], model_cfg)
        return rejection_sample(logits.reshape(B, K + 1, -1), drafts, sampling, extras,
                                jax.random.fold_in(base_key, step))

    return jax.jit(verify)


def verify_rows(num_scheduled: list[int], num_drafts: list[int], num_seqs: int, K: int):
    """Token positions of each request's K + 1 rows in the step: its last n + 1 tokens (the
    verified token, then its n drafts), then copies of the last for unused rows."""
    rows = np.zeros((num_seqs, K + 1), np.int32)
    offset = 0
    for b, (n_new, n_drafts) in enumerate(zip(num_scheduled, num_drafts)):
        last = offset + n_new - 1
        first = last - n_drafts
        rows[b] = np.minimum(np.arange(first, first + K + 1), last)
        offset += n_new
    return rows.reshape(-1)


def verify_inputs(requests, drafts: list[list[int]], num_seqs: int, K: int, vocab_size: int,
                  grammar_masks=None):
    """Host arrays for verify_program: drafts, sampling rows, the per-row extras or None.
    requests: RequestState per row (token_ids without this step's drafts)."""
    batch = build_draft_batch(drafts, num_seqs, K)
    sampling = build_sampling_batch([(r.options, r.num_output_tokens) for r in requests],
                                    num_seqs)
    extras = build_draft_extras(
        [(r.options, r.token_ids[:r.num_prompt_tokens], r.output_ids, d)
         for r, d in zip(requests, drafts)], num_seqs, K, vocab_size, grammar_masks)
    return batch, sampling, extras
