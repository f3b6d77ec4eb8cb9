"""Host-side request state that persists across steps, and the numpy build of a StepBatch."""

import dataclasses

import numpy as np

from xla_inference.kernels.metadata import AttentionMetadata
from xla_inference.models.interface import StepBatch
from xla_inference.sampling.host import SamplingOptions


@dataclasses.dataclass
class RequestState:
    req_id: str
    token_ids: list[int]  # prompt, then every token sampled so far
    num_prompt_tokens: int
    # KV pages in sequence order, one list per KV cache group (kernels/metadata.py); pages a
    # sliding-window group freed are the null page 0
    block_ids: list[list[int]]
    num_computed_tokens: int
    options: SamplingOptions = SamplingOptions()
    # (ids, logprobs, ranks) [P-1, n+1] filled chunk by chunk while the prompt is computed,
    # for a request that asked for prompt logprobs; None otherwise or once handed over.
    prompt_logprobs: tuple | None = None
    lora_id: int = 0  # the LoRA adapter the request runs with (lora/slots.py); 0: none
    # A multimodal family's request (runner/multimodal.py): its prompt's items
    # (models/interface.MultimodalItem), and its rope positions [3, P] and the delta of the
    # tokens after the prompt, filled at its first step.
    mm_items: list = dataclasses.field(default_factory=list)
    mrope_positions: np.ndarray | None = None
    mrope_delta: int = 0

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def trim_outputs(self, num_output_tokens: int) -> None:
        """Drop sampled tokens the scheduler did not keep (e.g. after a preemption)."""
        del self.token_ids[self.num_prompt_tokens + num_output_tokens:]


@dataclasses.dataclass
class BatchLayout:
    """The padded shape of a step, chosen by the engine from its buckets."""

    num_tokens: int  # T
    num_seqs: int  # B
    max_blocks: int  # width of the block table
    block_size: int
    num_groups: int = 1  # KV cache groups, each with its own block table


def build_step_batch(scheduled: list[tuple[RequestState, int]], layout: BatchLayout,
                     block_offset: int = 0) -> StepBatch:
    """Concatenate each request's next `n` tokens into one padded ragged batch, with a block
    table and slot mapping per KV cache group.

    block_offset: subtracted from every KV page id (a data parallel replica's pages are
    numbered from its first page on; its own page 0 is its null page).

    Padding tokens write their K/V into the null page (slot 0) and padding rows have no
    pages, so neither touches a real sequence. The padding tokens form a run of their own,
    at position 0 of the first row without a request, whose pages are all the null page;
    with every row taken they repeat the last request's last token (its row and position:
    they read what it reads). Never position 0 of a real row: merged into that row's run,
    they would widen its keys to position 0, on pages a sliding window may have freed. An
    empty `scheduled` gives the all-padding batch of the layout (warm-up).
    """
    T, B, G, bs = layout.num_tokens, layout.num_seqs, layout.num_groups, layout.block_size
    input_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    seq_ids = np.zeros(T, np.int32)
    slot_mapping = np.zeros((G, T), np.int32)
    block_tables = np.zeros((G, B, layout.max_blocks), np.int32)
    logits_indices = np.zeros(B, np.int32)
    start = 0
    for row, (req, num_new) in enumerate(scheduled):
        if len(req.block_ids) != G:
            raise ValueError(f"request {req.req_id} has pages of {len(req.block_ids)} KV cache "
                             f"groups; the engine has {G}")
        first = req.num_computed_tokens
        end = start + num_new
        pos = np.arange(first, first + num_new, dtype=np.int32)
        input_ids[start:end] = req.token_ids[first:first + num_new]
        positions[start:end] = pos
        seq_ids[start:end] = row
        for g, group_ids in enumerate(req.block_ids):
            blocks = np.asarray(group_ids, np.int32) - block_offset
            slot_mapping[g, start:end] = blocks[pos // bs] * bs + pos % bs
            block_tables[g, row, :len(blocks)] = blocks
        logits_indices[row] = end - 1
        start = end
    if len(scheduled) == B and start < T:
        seq_ids[start:] = B - 1
        positions[start:] = positions[start - 1]
    else:
        seq_ids[start:] = len(scheduled)
    attention = AttentionMetadata(positions, seq_ids, slot_mapping, block_tables, block_size=bs)
    return StepBatch(input_ids, attention, logits_indices)
