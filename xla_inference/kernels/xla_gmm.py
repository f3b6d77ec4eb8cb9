"""The grouped matmul (MoE experts) for XLA's CPU backend: jax.lax.ragged_dot's contract,

    gmm(lhs [M, K], rhs [E, K, N], group_sizes [E]) -> [M, N]

(lhs's rows sorted by group, the first group_sizes[0] through rhs[0], ...; rows past
sum(group_sizes) zero), computed as a loop over the Pallas GMM's work list
(pallas_gmm.group_metadata: one item per (row tile, group overlapping it)): each item one
[tm, K] x [K, N] product of its tile's rows by its group's weight, its group's rows kept.
The loop runs only the items that hold group rows (a while loop with a trip count read on
the device), so rows outside every group (a step's padding, routed to expert -1:
layers/moe.without_padding) cost nothing, and empty experts are never read.

Why not ragged_dot: JAX lowers it on the CPU to a dense product (lhs broadcast over the
E groups, masked per group, contracted with rhs over (E, K): one [M, E*K] x [E*K, N] dot),
so every row pays for every expert whatever the groups, rows outside every group included
(M = 512 rows, E = 128, K = 1024, N = 384, float32, the loaded 2-core machine: ragged_dot
~2 s with all rows in groups or half of them outside; this loop ~100 ms and ~55 ms;
benchmarks/moe_grouped_cpu.py). With fewer rows than experts (decode) each item is one
row: 64 rows of those experts ~18 ms against ~157 ms for each row's expert gathered.

Each row's product is one dot of its row by its own expert, accumulated in float32 (or
`preferred_element_type`): the sums ragged_dot computes, without the other experts' zero
terms. No partitioning rule: GSPMD would gather the experts a dynamic index reads, so the
caller (layers/moe.py) takes this loop only where no mesh axis is left to GSPMD.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xla_inference.kernels.pallas_gmm import HAS_GROUP, group_metadata

MIN_TILE, MAX_TILE = 1, 128


def row_tile(rows: int, groups: int) -> int:
    """Rows per item: about one group's mean share (a tile spanning several small groups
    is multiplied once per group), a power of two in [MIN_TILE, MAX_TILE]: one row an item
    for decode (fewer rows than experts: each row times its expert, read in place)."""
    mean = max(1, rows // max(groups, 1))
    return min(MAX_TILE, max(MIN_TILE, 1 << (mean - 1).bit_length()))


def work_items(md) -> jax.Array:
    """The items of a work list (pallas_gmm.GroupMetadata) that multiply group rows: the
    loop's trip count. They come first (row order; tiles past every group come last)."""
    return jnp.sum((md.item_flags & HAS_GROUP) != 0)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        preferred_element_type=None, tile: int | None = None) -> jax.Array:
    """lhs [M, K] (rows sorted by group) times rhs [E, K, N] per group -> [M, N] in
    `preferred_element_type` (default: lhs's and rhs's promoted dtype, as ragged_dot)."""
    m, k = lhs.shape
    groups, k2, n = rhs.shape
    if k2 != k or group_sizes.shape != (groups,):
        raise ValueError(f"gmm: lhs {lhs.shape}, rhs {rhs.shape} and group_sizes "
                         f"{group_sizes.shape} do not agree")
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))
    accumulate = jnp.promote_types(out_dtype, jnp.float32)
    tm = tile or row_tile(m, groups)
    tiles = -(-m // tm)
    padded = jnp.pad(lhs, ((0, tiles * tm - m), (0, 0)))
    md = group_metadata(group_sizes, tiles, tm)
    busy = work_items(md)

    def item(carry):
        i, out = carry
        tile_start, group = md.item_tile[i] * tm, md.item_group[i]
        rows = jax.lax.dynamic_slice_in_dim(padded, tile_start, tm)
        product = jnp.dot(rows, rhs[group], preferred_element_type=accumulate)
        row = tile_start + jnp.arange(tm)
        mine = (row >= md.group_starts[group]) & (row < md.group_ends[group])
        kept = jax.lax.dynamic_slice_in_dim(out, tile_start, tm)
        written = jnp.where(mine[:, None], product.astype(out_dtype), kept)
        return i + 1, jax.lax.dynamic_update_slice_in_dim(out, written, tile_start, 0)

    _, out = jax.lax.while_loop(lambda carry: carry[0] < busy, item,
                                (jnp.int32(0), jnp.zeros((tiles * tm, n), out_dtype)))
    return out[:m]
