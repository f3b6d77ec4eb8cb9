"""Pooling (embeddings, classification): what a step's forward gathers on device for the
pooling requests, and the host-side pooling and heads over it.

Each step the forward gathers, per request row, the hidden states of the row's last and
first scheduled token and the sum of the row's scheduled tokens (kv_cache, [3, B, D]): a
handful of rows, never every token's state. A request's prompt may run over several steps
(chunked prefill): the host keeps what each pooling type needs across the chunks
(PoolingAccumulator) and pools when the prompt is complete. Where a part of the prompt
came from the prefix cache its hidden states were never computed: LAST still pools right
(the last token is always computed), MEAN and CLS cannot, and vLLM turns prefix caching
and chunked prefill off for them; the accumulator refuses such a request rather than pool
a part of the prompt.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SEQ_POOLING_TYPES = ("LAST", "MEAN", "CLS")
# STEP (process reward models) is ALL's per-token output, then only the rows at the
# prompt's step-tag tokens and, if asked, only some of its columns (step_pooling_select).
TOKEN_POOLING_TYPES = ("ALL", "STEP")


def gather_pooled_rows(hidden: jax.Array, seq_ids: jax.Array, logits_indices: jax.Array,
                       num_seqs: int) -> jax.Array:
    """[3, B, D] float32 per row: the last scheduled token's hidden state, the first's, and
    the sum over the row's scheduled tokens (padding tokens carry the first free row's or
    the last row's id; the host reads only real rows, and the padding of a full batch is
    excluded from the sum by its position in the bucket, see `real_tokens`)."""
    h = hidden.astype(jnp.float32)
    T = hidden.shape[0]
    last = h[logits_indices]
    # A row's first token: one past the previous row's last (rows are contiguous, in order).
    first_index = jnp.concatenate([jnp.zeros(1, jnp.int32), logits_indices[:-1] + 1])
    first = h[jnp.minimum(first_index, T - 1)]
    # Tokens past the row's last scheduled one (the padding of a full batch) are left out.
    token = jnp.arange(T, dtype=jnp.int32)
    inside = token <= logits_indices[jnp.minimum(seq_ids, num_seqs - 1)]
    sums = jax.ops.segment_sum(jnp.where(inside[:, None], h, 0.0), seq_ids,
                               num_segments=num_seqs)
    return jnp.stack([last, first, sums])


@dataclasses.dataclass
class PoolingAccumulator:
    """One pooling request's state across the steps of its prompt."""

    pooling_type: str  # LAST, MEAN, CLS (sequence) or ALL, STEP (token)
    num_prompt_tokens: int
    first: np.ndarray | None = None
    total: np.ndarray | None = None
    count: int = 0
    rows: list = dataclasses.field(default_factory=list)  # ALL: each chunk's hidden states

    def add(self, first_position: int, num_new: int, last_row, first_row, sum_row,
            hidden_rows=None) -> np.ndarray | None:
        """Take one step's chunk (its first position, its length and what the forward
        gathered for its row); -> the pooled hidden state ([D], ALL and STEP: [P, D]) once
        the prompt is complete, else None."""
        if self.pooling_type == "LAST":
            self.count = first_position  # a prefix from the cache: LAST needs only the end
        if first_position != self.count:
            raise ValueError(
                f"{self.pooling_type} pooling needs the hidden state of every prompt token, "
                f"but the prompt's tokens from {self.count} to {first_position} were not "
                "computed (taken from the prefix cache); vLLM serves this pooling type "
                "without prefix caching (--no-enable-prefix-caching)")
        if self.count == 0:
            self.first = np.asarray(first_row, np.float32)
        self.total = np.asarray(sum_row, np.float32) + (0 if self.total is None else self.total)
        if self.pooling_type in TOKEN_POOLING_TYPES:
            self.rows.append(np.asarray(hidden_rows, np.float32))
        self.count += num_new
        if self.count < self.num_prompt_tokens:
            return None
        if self.pooling_type == "LAST":
            return np.asarray(last_row, np.float32)
        if self.pooling_type == "CLS":
            return self.first
        if self.pooling_type == "MEAN":
            return self.total / self.count
        return np.concatenate(self.rows)


def step_pooling_select(rows: np.ndarray, prompt_token_ids, step_tag_id: int | None,
                        returned_token_ids) -> np.ndarray:
    """STEP pooling as vLLM defines it (a process reward model scores each reasoning step
    at the token that ends it): of the per-token states [P, D], only the columns
    `returned_token_ids` (unless none or empty) and only the rows whose prompt token is
    `step_tag_id` (unless None: every row). Applied before the head, as vLLM does."""
    if returned_token_ids:
        rows = rows[:, list(returned_token_ids)]
    if step_tag_id is not None:
        rows = rows[np.asarray(prompt_token_ids) == step_tag_id]
    return rows


def embedding_head(pooled: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """vLLM's embedding head: Matryoshka truncation to `dimensions`, then L2 normalization
    when the request's use_activation is on (the last axis: one vector or one per token)."""
    out = pooled if dimensions is None else pooled[..., :dimensions]
    if normalize:
        norm = np.linalg.norm(out, axis=-1, keepdims=True)
        out = out / np.maximum(norm, 1e-12)
    return out


# Classification activations as transformers' sequence-classification losses imply them
# (vLLM follows the config's problem_type, else sigmoid for one label, softmax for more).
CLASSIFY_ACTIVATIONS = ("sigmoid", "softmax", "identity")


def classification_activation(problem_type: str | None, num_labels: int) -> str:
    if problem_type == "regression":
        return "identity"
    if problem_type == "multi_label_classification":
        return "sigmoid"
    return "sigmoid" if num_labels < 2 else "softmax"


def classification_head(pooled: np.ndarray, score_weight: np.ndarray, activation: str | None
                        ) -> np.ndarray:
    """Logits of the score layer (a bias-free linear [labels, D]) over the pooled state,
    then the activation (None: the raw logits, a request's use_activation=False)."""
    logits = pooled @ score_weight.T
    if activation is None or activation == "identity":
        return logits
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)
