"""The ragged step batch: what one jitted step consumes (see DESIGN.md, the step contract)."""

import dataclasses

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepBatch:
    """One scheduler step, padded to a token bucket T and a request bucket B."""

    input_ids: jax.Array  # [T] int32, new tokens of all requests, concatenated
    positions: jax.Array  # [T] int32, position of each token in its sequence
    seq_ids: jax.Array  # [T] int32, row of each token's request in the batch
    slot_mapping: jax.Array  # [T] int32, KV slot each new token is written to
    query_start_loc: jax.Array  # [B+1] int32, start of each request's tokens
    seq_lens: jax.Array  # [B] int32, tokens per sequence after this step (0 = padding row)
    block_tables: jax.Array  # [B, max_blocks] int32, KV pages of each sequence
    logits_indices: jax.Array  # [B] int32, the token of each request that is sampled
    block_size: int = dataclasses.field(default=16, metadata=dict(static=True))  # KV page size

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    """Per-request sampling parameters, padded to B rows."""

    temperature: jax.Array  # [B] float32, <= 0 means greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32, 1 = off


def empty_step_batch(num_tokens: int, num_seqs: int, max_blocks: int, block_size: int) -> StepBatch:
    """An all-padding batch of the given bucket (used for warm-up)."""
    zeros = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    return StepBatch(
        input_ids=zeros(num_tokens),
        positions=zeros(num_tokens),
        seq_ids=zeros(num_tokens),
        slot_mapping=zeros(num_tokens),
        query_start_loc=zeros(num_seqs + 1),
        seq_lens=zeros(num_seqs),
        block_tables=zeros(num_seqs, max_blocks),
        logits_indices=zeros(num_seqs),
        block_size=block_size,
    )


def greedy_sampling_batch(num_seqs: int) -> SamplingBatch:
    return SamplingBatch(
        temperature=np.zeros(num_seqs, np.float32),
        top_k=np.zeros(num_seqs, np.int32),
        top_p=np.ones(num_seqs, np.float32),
    )
