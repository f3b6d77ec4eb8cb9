"""Collective matmuls for tensor parallel: the products of a row- or column-parallel
projection interleaved with the ring of collective permutes that moves their operands or
partial sums, so that each hop travels while the next partial product is computed.

Under tensor parallel a column-parallel weight ([out, in] split on out: q/k/v, gate, up)
needs the whole activation on every device, and a row-parallel weight (split on in: the
attention output and MLP down projections) leaves each device a partial sum of the whole
output. Left to GSPMD, the latter is a product followed by an all-reduce, during which the
devices wait. Written here as a ring over the n devices of the tensor-parallel axis:

- matmul + reduce-scatter (ring_matmul_reduce_scatter): the output's features are cut into
  n chunks; at hop s device i computes its partial product for chunk (i - s - 1) mod n
  and adds it to the running sum its neighbour sent, then passes the sum on. After n - 1
  hops device i holds chunk i complete. Each product is independent of the permute in
  flight, so the two overlap where the hardware runs collectives asynchronously (TPU ICI,
  GPU NVLink). The chunks are output features, not tokens: every hop reads a different
  1/n of the weight, so the weight is read once in all, which is what a decode step
  (a few tokens, weight-bound) needs; chunking by tokens would read it n times.
- all-gather + matmul (ring_all_gather_matmul): an activation split over tokens is passed
  round the ring while each device multiplies the chunk it holds by its column-parallel
  weight, filling its rows of the output.

Our residual stream is replicated across the tensor-parallel devices (the decoder adds
each block's output to it whole), so the layers need the row-parallel product with a
replicated result: row_parallel_matmul = ring reduce-scatter, then an all-gather of the n
chunks (the all-reduce split in its two halves, the first hidden behind the products).
matmul_reduce_scatter and all_gather_matmul are the two halves a sequence-parallel
residual stream (split over tokens between blocks) would use instead; they are built and
tested here, not used by the decoder yet.

Every function takes `product(x, w) -> x @ w.T` for a [out, in] weight, so the layers pass
their own (layers/linear.project: the precision policy's narrow weights); by default the
plain einsum. These run on any platform; on XLA's CPU backend (virtual devices of one
process) the permutes are memory copies, so they prove the schedule and its results, not
the overlap.

When the layers take the ring (ring_pays): each hop's weight chunk is picked by the
device's place on the ring, a dynamic slice. XLA's CPU backend copies it out of the weight
(the weight is then read twice), and its collectives are rendezvous of threads sharing the
same cores: on the CPU the ring measured slower than GSPMD's all-reduce at every size
tried (/tmp/team/h6-tp-docs.md), so by default ("auto") only accelerators take it, and only
for steps of at least RING_MIN_TOKENS rows. A decode step's products are weight-bound and
its partial sums tiny: the n - 1 hops would add latency with nothing to hide; a prefill's
hop carries [T, D/n] while a [T, F/n] x [F/n, D/n] product runs, which is where the overlap
pays. RING_MIN_TOKENS is an estimate to be tuned on the hardware (not measured yet).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from xla_inference.parallel.sharding import TENSOR_AXIS


# "auto": accelerators (RING_PLATFORMS) from RING_MIN_TOKENS rows; "always" (tests, and to
# measure the ring on the CPU); "never".
RING_POLICY = "auto"
RING_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")
RING_MIN_TOKENS = 256


def ring_pays(num_rows: int) -> bool:
    """Whether a row-parallel product of num_rows rows takes the ring (module docstring)."""
    if RING_POLICY in ("always", "never"):
        return RING_POLICY == "always"
    return jax.default_backend() in RING_PLATFORMS and num_rows >= RING_MIN_TOKENS


def dense_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] times w [out, in] -> [..., out]."""
    return jnp.einsum("...i,oi->...o", x, w)


def _ring(axis_size: int) -> list[tuple[int, int]]:
    """Each device sends to the next one round the axis."""
    return [(d, (d + 1) % axis_size) for d in range(axis_size)]


# ---------------------------------------------------------------------------------------
# Per-device rings (inside a shard_map over axis_name)


def ring_matmul_reduce_scatter(x, w, *, axis_name: str, axis_size: int,
                               product: Callable = dense_product):
    """x [..., F/n] (this device's share of the contracted axis), w [D, F/n] -> [..., D/n]:
    chunk i (device i's place on the axis) of the sum over devices of x @ w.T."""
    device = jax.lax.axis_index(axis_name)
    chunk = w.shape[0] // axis_size

    def partial(hop):
        part = (device - hop - 1) % axis_size  # the chunk the sum arriving at this hop is for
        return product(x, jax.lax.dynamic_slice_in_dim(w, part * chunk, chunk, axis=0))

    total = partial(0)
    # Unrolled (n is a handful): each product is free of the permute in flight beside it.
    for hop in range(1, axis_size):
        total = jax.lax.ppermute(total, axis_name, _ring(axis_size)) + partial(hop)
    return total


def ring_all_gather_matmul(x, w, *, axis_name: str, axis_size: int,
                           product: Callable = dense_product):
    """x [T/n, D] (device i holds token chunk i), w [F/n, D] -> [T, F/n]: every token's
    product with this device's weight columns, the chunks passed round the ring."""
    device = jax.lax.axis_index(axis_name)
    rows = x.shape[0]
    held = x
    out = None
    for hop in range(axis_size):
        if hop + 1 < axis_size:  # sent on while this hop's product runs
            arriving = jax.lax.ppermute(held, axis_name, _ring(axis_size))
        y = product(held, w)
        if out is None:
            out = jnp.zeros((rows * axis_size, *y.shape[1:]), y.dtype)
        owner = (device - hop) % axis_size  # whose tokens this device holds at this hop
        out = jax.lax.dynamic_update_slice_in_dim(out, y, owner * rows, axis=0)
        if hop + 1 < axis_size:
            held = arriving
    return out


# ---------------------------------------------------------------------------------------
# Whole-array forms: shard_map over the mesh's tensor-parallel axis


def _split_last(ndim: int) -> PartitionSpec:
    return PartitionSpec(*(None,) * (ndim - 1), TENSOR_AXIS)


def _over_tensor_axis(body, mesh, in_specs, out_specs):
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         axis_names={TENSOR_AXIS}, check_vma=False)


def row_parallel_matmul(x, w, mesh, product: Callable = dense_product):
    """x [..., F] split over the tensor axis on F, w [D, F] split on F -> x @ w.T [..., D],
    whole on every device: ring reduce-scatter over D, then an all-gather. D must divide
    by the axis size."""
    n = mesh.shape[TENSOR_AXIS]

    def body(x, w):
        part = ring_matmul_reduce_scatter(x, w, axis_name=TENSOR_AXIS, axis_size=n,
                                          product=product)
        return jax.lax.all_gather(part, TENSOR_AXIS, axis=part.ndim - 1, tiled=True)

    return _over_tensor_axis(body, mesh, (_split_last(x.ndim), PartitionSpec(None, TENSOR_AXIS)),
                             PartitionSpec())(x, w)


def matmul_reduce_scatter(x, w, mesh, product: Callable = dense_product):
    """As row_parallel_matmul, but the result stays split over the tensor axis on D."""
    n = mesh.shape[TENSOR_AXIS]

    def body(x, w):
        return ring_matmul_reduce_scatter(x, w, axis_name=TENSOR_AXIS, axis_size=n,
                                          product=product)

    split = _split_last(x.ndim)
    return _over_tensor_axis(body, mesh, (split, PartitionSpec(None, TENSOR_AXIS)), split)(x, w)


def all_gather_matmul(x, w, mesh, product: Callable = dense_product):
    """x [T, D] split over the tensor axis on T, w [F, D] split on F -> x @ w.T [T, F]
    split on F (the column-parallel layout). T must divide by the axis size."""
    n = mesh.shape[TENSOR_AXIS]

    def body(x, w):
        return ring_all_gather_matmul(x, w, axis_name=TENSOR_AXIS, axis_size=n, product=product)

    return _over_tensor_axis(body, mesh, (PartitionSpec(TENSOR_AXIS, None),
                                          PartitionSpec(TENSOR_AXIS, None)),
                             PartitionSpec(None, TENSOR_AXIS))(x, w)
