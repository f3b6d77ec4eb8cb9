"""What attention reads about a step, and the paged KV cache as the layers see it: the
contract between the runner, which builds both, and the kernels. Lives beside the kernels
so that layers and models depend on it without depending on the runner (see
docs/DESIGN.md, the step contract).

KV cache groups: a model whose layers keep different spans of their sequences (full
attention beside sliding windows) has one block table per group of layers that keep the
same span (vLLM's hybrid KV cache: the pages of a sliding group that fall out of its
window are freed and come back as the null page 0). Every group's tables index the same
pool of pages, and layers of different groups may share one cache array: a page belongs
to one group at a time."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    """A step's ragged layout over the paged KV cache, padded to T tokens and B sequences,
    with G KV cache groups (one block table and slot mapping per group).

    Padding tokens write into the null page (slot 0) and belong to a row of their own, so
    they never touch a real sequence."""

    positions: jax.Array  # [T] int32, position of each token in its sequence
    seq_ids: jax.Array  # [T] int32, row of each token's request in block_tables
    slot_mapping: jax.Array  # [G, T] int32, KV slot each new token is written to, per group
    block_tables: jax.Array  # [G, B, max_blocks] int32, KV pages of each sequence, per group
    block_size: int = dataclasses.field(default=16, metadata=dict(static=True))  # KV page size

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[-1]

    def real_tokens(self) -> jax.Array:
        """[T] bool: the step's tokens, not its padding. Padding tokens, and only they,
        write the null slot 0 (page 0 is the null page: never a request's, and a data
        parallel replica's pages are numbered from its own null page), in every group.
        Without KV cache groups every token is real."""
        if self.slot_mapping.shape[0] == 0:
            return jax.numpy.ones(self.num_tokens, bool)
        return self.slot_mapping[0] != 0

    def group(self, group: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(slot_mapping [T], block_tables [B, max_blocks]) of one KV cache group."""
        return self.slot_mapping[group], self.block_tables[group]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """One layer's share of the paged KV cache: its arrays, read and written through its
    group's block table."""

    arrays: tuple[jax.Array, ...]  # K and V [num_slots, K, H]; MLA: its one latent array
    # [] int32, the layer's KV cache group. Traced, not static, so that a jitted layer is
    # traced once for every group; the index is a constant of the step program.
    group: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KvCache:
    """The whole paged KV cache: the arrays, and for each layer which arrays it uses and
    which group's block table reads them. Layers of different groups that vLLM places on
    the same memory share arrays (each array holds every page of the pool; a page is used
    by one group at a time). Without groups: one group, one set of arrays per layer."""

    arrays: list[tuple[jax.Array, ...]]  # per set: K and V [num_slots, K, H] (MLA: one)
    layer_arrays: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # per layer
    layer_groups: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # per layer

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.arrays[self.layer_arrays[i]], np.int32(self.layer_groups[i]))

    def updated(self, i: int, layer: LayerCache) -> KvCache:
        """This cache with layer i's arrays replaced by its updated ones."""
        arrays = list(self.arrays)
        arrays[self.layer_arrays[i]] = tuple(layer.arrays)
        return dataclasses.replace(self, arrays=arrays)
