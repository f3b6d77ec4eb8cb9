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
    """Per-request sampling parameters, padded to B rows (padding rows are greedy)."""

    temperature: jax.Array  # [B] float32, 0 means greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32, 1 = off
    min_p: jax.Array  # [B] float32, 0 = off
    seeded: jax.Array  # [B] bool, the row draws from its own seed's stream
    seed: jax.Array  # [B, 2] uint32, low and high words of the request's seed
    seed_offset: jax.Array  # [B] int32, tokens the request has generated so far
    want_logprobs: jax.Array  # [] bool, some row asked for logprobs


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingExtras:
    """Per-row logit processing before sampling; built only for steps that need it."""

    logit_adjust: jax.Array  # [B, V] float32, added first: bias, or -inf for a banned token
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
    logprobs: jax.Array  # [B, k+1] float32, log-softmax of the raw logits
    ranks: jax.Array  # [B] int32, rank of the sampled token (1 = most likely)


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
        min_p=np.zeros(num_seqs, np.float32),
        seeded=np.zeros(num_seqs, bool),
        seed=np.zeros((num_seqs, 2), np.uint32),
        seed_offset=np.zeros(num_seqs, np.int32),
        want_logprobs=np.asarray(False),
    )


def neutral_sampling_extras(num_seqs: int, vocab_size: int) -> SamplingExtras:
    """Extras that change nothing: the starting point rows fill in."""
    return SamplingExtras(
        logit_adjust=np.zeros((num_seqs, vocab_size), np.float32),
        output_counts=np.zeros((num_seqs, vocab_size), np.float32),
        prompt_mask=np.zeros((num_seqs, vocab_size), bool),
        presence_penalty=np.zeros(num_seqs, np.float32),
        frequency_penalty=np.zeros(num_seqs, np.float32),
        repetition_penalty=np.ones(num_seqs, np.float32),
    )
