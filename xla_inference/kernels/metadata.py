"""What attention reads about a step: the contract between the runner, which builds it on
the host, and the kernels. Lives beside the kernels so that layers and models depend on it
without depending on the runner (see docs/DESIGN.md, the step contract)."""

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    """A step's ragged layout over the paged KV cache, padded to T tokens and B sequences.

    Padding tokens write into the null page (slot 0) and belong to a row of their own, so
    they never touch a real sequence."""

    positions: jax.Array  # [T] int32, position of each token in its sequence
    seq_ids: jax.Array  # [T] int32, row of each token's request in block_tables
    slot_mapping: jax.Array  # [T] int32, KV slot each new token is written to
    block_tables: jax.Array  # [B, max_blocks] int32, KV pages of each sequence
    block_size: int = dataclasses.field(default=16, metadata=dict(static=True))  # KV page size

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[-1]
