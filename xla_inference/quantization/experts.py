"""Quantized MoE experts as the device holds them (PackedExperts), and the grouped
("ragged") product over them that layers/moe.py runs.

A MoE block's E experts are stacked on a leading axis, each in the layout of a quantized
projection (quantization/packed.PackedWeight, [out, in]): for 4- and 8-bit integers the
native CPU kernel's tiles of 16 output rows, for FP8 the plain [out, in] values; scales and
offsets likewise, one more leading axis:

    values  [E, out/16, in/2 (8-bit) or in/4 (4-bit), 32]  or FP8 [E, out, in]
    scales, offsets  [E, out/16, groups, 16]  or FP8 [E, out, groups]; offsets may be None

or, where the Pallas grouped matmul will multiply them (layout K_MAJOR, decided once at
load: `stored_for_step`), every expert in that kernel's K-major layout
(kernels/pallas_quantized_matmul.py), which the step hands to the kernel unchanged:

    values  [E, in, out] (int8, FP8) or uint8 [E, in/2, out] (4-bit, two inputs a byte)
    scales, offsets  [E, groups, out]

Their logical shape is the dense experts' [E, in, out] (what jax.lax.ragged_dot
multiplies), and they shard as the dense ones do: experts over the "model" mesh axis
(`array_axes` maps the weight's logical axes onto these arrays).

They are made at load from each expert's host GroupQuant ([out, in], a quantized
checkpoint's `experts.{i}.gate_proj` etc.: `pack_experts`) or by online int8 / fp8
quantization of float experts, per expert and output channel (`quantize_experts`), in the
first layout; loading/params.pack_quantized then stores them for the step
(`stored_for_step`: the K-major layout where the Pallas GMM will serve them, converted by
pallas_quantized_matmul.accelerator_layout, the one converter the dense weights' tests
check too; else unchanged).

The product (`ragged_product`):
- on the host CPU (4- and 8-bit experts, the native kernel there): with fewer rows than
  experts (decode), each row through the kernel on its own expert's packed bytes (sliced
  out; no dequantized copy); otherwise each expert that has rows sliced out once and its
  rows through the kernel a few at a time. Both loop in XLA (one compiled body whatever
  the rows). XLA's CPU ragged_dot multiplies every row by every expert: 20 to 40 times
  slower for 128 experts;
- elsewhere, with fewer rows than experts: each row's expert gathered and dequantized
  alone, so a step reads the chosen experts' bytes only;
- on a TPU or GPU (kernels/pallas_gmm.gmm_route) with at least as many rows as experts,
  for experts stored in its layout: the Pallas GMM over the stored arrays as they are
  (gmm_quantized: dequantized tile by tile in the kernel; no relayout in the step);
- otherwise every expert is dequantized inside the step and a grouped product runs: the
  Pallas GMM (kernels/pallas_gmm.py) on a TPU or GPU, XLA's ragged_dot elsewhere.
Every path but the native kernel's (which needs the tiles, and so keeps them at load)
takes either layout: XLA dequantizes each through packed.dequantize."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.kernels import pallas_gmm, xla_gmm
from xla_inference.parallel.sharding import left_to_gspmd
from xla_inference.kernels import pallas_quantized_matmul as qmm
from xla_inference.quantization import packed, product
from xla_inference.quantization.groups import (FLOAT_ACTIVATIONS, INT4, INT8, GroupQuant, regroup)
from xla_inference.quantization.online import quantize_per_channel
from xla_inference.quantization.packed import K_MAJOR, OUT_IN, PackedWeight
from xla_inference.quantization.sliced import LazyArray, reads_by_block

logger = logging.getLogger(__name__)

# Rows of one expert the native kernel multiplies in one call when there are at least as
# many rows as experts (E = 128, in 1024, out 384 int8: 512 rows in 24 ms in chunks of 8,
# 39 ms in chunks of 32, 47 ms one row a call; XLA's ragged_dot 940 ms).
KERNEL_CHUNK = 8


def _static(**kwargs) -> dataclasses.Field:
    return dataclasses.field(metadata={"static": True}, **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedExperts:
    """E quantized experts of logical shape [E, in, out], each stored as a PackedWeight's
    [out, in] arrays (layout in the module docstring)."""

    values: jax.Array
    scales: jax.Array
    offsets: jax.Array | None
    kind: str = _static()
    group_size: int = _static()  # the kernel's group size (packed.kernel_group_size)
    in_features: int = _static()
    out_features: int = _static()
    activations: str = _static(default=FLOAT_ACTIVATIONS)
    # The dtype the product dequantizes into (as PackedWeight.compute_dtype).
    compute_dtype: str = _static(default="float32")
    # Subtracted from every value before scaling (as PackedWeight.zero_point; 0: none).
    zero_point: int = _static(default=0)
    # OUT_IN (the native CPU kernel's tiles; FP8 plain [out, in]) or K_MAJOR (the Pallas
    # kernels': module docstring), as PackedWeight.layout.
    layout: str = _static(default=OUT_IN)

    @property
    def num_experts(self) -> int:
        return self.values.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The logical [E, in, out] shape, that of the dense experts it replaces."""
        return (self.num_experts, self.in_features, self.out_features)

    @property
    def tiled(self) -> bool:
        """In the native CPU kernel's tiles (4- and 8-bit integers in the OUT_IN layout)."""
        return self.kind in (INT4, INT8) and self.layout == OUT_IN

    @property
    def bits(self) -> int:
        return 4 if self.kind == INT4 else 8

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in (self.values, self.scales, self.offsets) if a is not None)

    def array_axes(self, axes: tuple) -> tuple:
        """The logical axes of the stored arrays, given the weight's [experts, in, out]
        axes: each expert is [out, in] (tiles: [out tiles, in chunks or groups, 16]), or
        K_MAJOR [in (4 bits: in / 2), out] and [groups, out]."""
        experts, inp, out = axes
        if self.layout == K_MAJOR:
            return (experts, inp, out)
        return (experts, out, inp) + ((None,) if self.tiled else ())

    def expert(self, values, scales, offsets) -> PackedWeight:
        """One expert's arrays (sliced out of these) as a PackedWeight."""
        zero = {"zero_point": self.zero_point} if self.zero_point else {}
        return PackedWeight(values, scales, offsets, self.kind, self.group_size,
                            self.out_features, self.in_features, self.activations,
                            self.compute_dtype, layout=self.layout, **zero)


# ------------------------------------------------------------------ on the host (numpy)

def _check_alike(quants: Sequence[GroupQuant]) -> None:
    first = quants[0]
    for q in quants[1:]:
        if (q.kind, q.shape, q.activations, q.offsets is None) != (
                first.kind, first.shape, first.activations, first.offsets is None):
            raise ValueError(f"experts {first.name} and {q.name} are quantized differently "
                             f"({first.kind} {first.shape} vs {q.kind} {q.shape}, offsets or "
                             "activations); a MoE block's experts must share one scheme")


def pack_experts(quants: Sequence[GroupQuant], compute_dtype="float32") -> PackedExperts:
    """Each expert's host GroupQuant ([out, in]) -> the stacked device layout (numpy
    arrays; placed by the engine). Experts with different group sizes share the largest
    group size that divides each (regroup: exact)."""
    quants = list(quants)
    _check_alike(quants)
    common = math.gcd(*(q.group_size for q in quants))
    each = [packed.pack(regroup(q, common) if q.group_size != common else q, compute_dtype)
            for q in quants]
    if len({(_zero_point(w), w.offsets is None) for w in each}) > 1:
        each = [_with_explicit_offsets(w) for w in each]  # one layout for every expert
    first = each[0]
    # Mixed float16 / float32 scales (packed.group_array decides per expert) stack as
    # float32: exact.
    stack = lambda name: np.stack([getattr(w, name) for w in each])  # noqa: E731
    return PackedExperts(stack("values"), stack("scales"),
                         None if first.offsets is None else stack("offsets"), first.kind,
                         first.group_size, first.in_features, first.out_features,
                         first.activations, first.compute_dtype, _zero_point(first))


def _zero_point(w: PackedWeight) -> int:
    return getattr(w, "zero_point", 0)


def _with_explicit_offsets(w: PackedWeight) -> PackedWeight:
    """w with its zero point folded into float32 offsets (q - z) * s + o = q * s + (o - z * s)
    and offsets present (zero where it had none): experts packed differently share that."""
    scales = np.asarray(w.scales, np.float32)
    offsets = np.zeros_like(scales) if w.offsets is None else np.asarray(w.offsets, np.float32)
    offsets = offsets - _zero_point(w) * scales
    zero = {"zero_point": 0} if _zero_point(w) else {}
    return dataclasses.replace(w, offsets=offsets, **zero)


def quantize_experts(weights: np.ndarray, kind: str) -> PackedExperts:
    """Online quantization of float experts [E, in, out]: each expert's every output
    channel to `kind` (INT8 or FP8) with one scale, as quantize_per_channel does a
    projection's rows."""
    weights = np.asarray(weights)
    return pack_experts([quantize_per_channel(weights[e].T, kind)
                         for e in range(weights.shape[0])])


def with_compute_dtype(experts: PackedExperts, compute_dtype) -> PackedExperts:
    return dataclasses.replace(experts, compute_dtype=jnp.dtype(compute_dtype).name)


def to_kernel_layout(w: PackedExperts) -> PackedExperts:
    """w (numpy arrays, OUT_IN) with every expert converted to the Pallas kernels' K-major
    layout by pallas_quantized_matmul.accelerator_layout (a rewrite of every byte, once,
    on the host: load time)."""
    if w.layout == K_MAJOR:
        return w
    each = [qmm.accelerator_layout(
        np.asarray(w.values[e]), np.asarray(w.scales[e]),
        None if w.offsets is None else np.asarray(w.offsets[e]), bits=w.bits,
        in_features=w.in_features, out_features=w.out_features) for e in range(w.num_experts)]
    stack = lambda i: np.ascontiguousarray(np.stack([arrays[i] for arrays in each]))  # noqa: E731
    return dataclasses.replace(w, values=stack(0), scales=stack(1),
                               offsets=None if w.offsets is None else stack(2), layout=K_MAJOR)


def stored_for_step(w: PackedExperts) -> PackedExperts:
    """The layout the step's grouped product will read w in, decided once at load (as
    packed.pack decides a projection's): K_MAJOR where the Pallas GMM will multiply the
    experts (kernels/pallas_gmm.gmm_route: a TPU or GPU, or XLA_INFERENCE_GMM_BACKEND;
    not where the native CPU kernel serves them, which reads the tiles; its kernels take
    their shape and groups), else unchanged."""
    route = pallas_gmm.gmm_route()
    if route is None or w.layout == K_MAJOR or _uses_kernel(w) or not _pallas_fits(w, route):
        return w
    logger.info("xla-inference: %d %s MoE experts [%d, %d] stored in the Pallas %s grouped "
                "matmul's layout", w.num_experts, w.kind, w.in_features, w.out_features,
                route.backend)
    return to_kernel_layout(w)


# ------------------------------------------------------------------ on the device (jnp)

def _dequantized(w: PackedExperts, values, scales, offsets, dtype) -> jax.Array:
    """Stored arrays of N experts (all of them, or one gathered per row) -> [N, in, out]."""
    one = lambda v, s, o: packed.dequantize(w.expert(v, s, o), dtype).T  # noqa: E731
    return jax.vmap(one)(values, scales, offsets)


def dequantize_experts(w: PackedExperts, dtype=None) -> jax.Array:
    """Every expert's [in, out] weight: [E, in, out] in `dtype` (default w.compute_dtype)."""
    return _dequantized(w, w.values, w.scales, w.offsets, jnp.dtype(dtype or w.compute_dtype))


def _take(w: PackedExperts, experts: jax.Array) -> tuple:
    """The stored arrays of the experts `experts` (indices, any shape)."""
    pick = lambda a: None if a is None else jnp.take(a, experts, axis=0)  # noqa: E731
    return pick(w.values), pick(w.scales), pick(w.offsets)


def row_experts(group_sizes: jax.Array, rows: int) -> jax.Array:
    """The expert of each of `rows` rows sorted by expert ([E] rows per expert) -> [rows]."""
    ends = jnp.cumsum(group_sizes)
    expert = jnp.searchsorted(ends, jnp.arange(rows, dtype=ends.dtype), side="right")
    return jnp.minimum(expert, group_sizes.shape[0] - 1).astype(jnp.int32)


def uses_native_kernel(w) -> bool:
    """Whether w (experts of any kind) are quantized experts the native CPU kernel multiplies."""
    return isinstance(w, PackedExperts) and _uses_kernel(w)


def _uses_kernel(w: PackedExperts) -> bool:
    """Whether the native kernel runs these experts' products (KERNEL_CHUNK rows at most)."""
    return product.uses_kernel(w, KERNEL_CHUNK)


def _expert_at(w: PackedExperts, expert: jax.Array) -> PackedWeight:
    """Expert `expert` (a traced index) as a PackedWeight: a dynamic slice, a plain copy of
    its bytes (XLA's gather copies them slower: 86 against 50 us for 1024 x 384 int8)."""
    pick = lambda a: (None if a is None  # noqa: E731
                      else jax.lax.dynamic_index_in_dim(a, expert, 0, keepdims=False))
    return w.expert(pick(w.values), pick(w.scales), pick(w.offsets))


def _kernel_rows(xs: jax.Array, w: PackedExperts, experts: jax.Array, rows_used: jax.Array
                 ) -> jax.Array:
    """Each of the first `rows_used` rows (those in the groups) through a projection's
    product (the native kernel) on its own expert's packed bytes, sliced out: [R, out]
    float32, the rows past them zero (padding and other devices' pairs sort there: no
    kernel call). A loop over the rows rather than unrolled: XLA compiles one row's slice
    and call whatever the rows (unrolled, 32 rows took 3.9 s to compile per MoE layer)."""
    def one_row(r, out):
        x = jax.lax.dynamic_slice_in_dim(xs, r, 1)
        y = product.quantized_project(x, _expert_at(w, experts[r]), jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(out, y, r, 0)

    out = jnp.zeros((xs.shape[0], w.out_features), jnp.float32)
    return jax.lax.fori_loop(0, rows_used, one_row, out)


def _kernel_groups(xs: jax.Array, w: PackedExperts, group_sizes: jax.Array) -> jax.Array:
    """Each expert that has rows copied out once, its rows through the native kernel
    KERNEL_CHUNK at a time: [R, out] float32. Loops (one compiled body) over the experts
    with rows, in order, and over each one's chunks; a chunk that runs past its expert's
    rows writes those rows back unchanged (the next expert writes them later)."""
    rows, chunk = xs.shape[0], KERNEL_CHUNK
    starts = jnp.cumsum(group_sizes) - group_sizes
    busy = jnp.nonzero(group_sizes > 0, size=group_sizes.shape[0], fill_value=0)[0]
    padded = jnp.concatenate([xs, jnp.zeros((chunk, xs.shape[1]), xs.dtype)])  # no clamping

    def expert_rows(i, out):
        expert = busy[i]
        start, size = starts[expert], group_sizes[expert]
        weight = _expert_at(w, expert)

        def chunk_rows(c, out):
            first = start + c * chunk
            y = product.quantized_project(jax.lax.dynamic_slice_in_dim(padded, first, chunk),
                                          weight, jnp.float32)
            mine = (c * chunk + jnp.arange(chunk) < size)[:, None]
            y = jnp.where(mine, y, jax.lax.dynamic_slice_in_dim(out, first, chunk))
            return jax.lax.dynamic_update_slice_in_dim(out, y, first, 0)

        return jax.lax.fori_loop(0, (size + chunk - 1) // chunk, chunk_rows, out)

    out = jnp.zeros((rows + chunk, w.out_features), jnp.float32)
    return jax.lax.fori_loop(0, jnp.sum(group_sizes > 0), expert_rows, out)[:rows]


def _gathered_rows(xs: jax.Array, w: PackedExperts, experts: jax.Array) -> jax.Array:
    """Each row times its own expert, dequantized alone: [R, out] float32."""
    xs = product.scheme_activations(xs, w)
    compute = jnp.dtype(w.compute_dtype)
    weights = _dequantized(w, *_take(w, experts), compute)  # [R, in, out]
    return jnp.einsum("ri,rio->ro", xs.astype(compute), weights,
                      preferred_element_type=jnp.float32)


def _every_expert(xs: jax.Array, w: PackedExperts, group_sizes: jax.Array) -> jax.Array:
    """Every expert dequantized, then the grouped product: the Pallas GMM on a TPU or GPU
    (its tiles visit only the experts with rows), on the CPU the work-list loop
    (kernels/xla_gmm.py: each row times its own expert) where no mesh axis is left to
    GSPMD, else XLA's ragged_dot (every row times every expert on the CPU)."""
    xs = product.scheme_activations(xs, w)
    compute = jnp.dtype(w.compute_dtype)
    route = pallas_gmm.gmm_route()
    if route is not None:
        return pallas_gmm.gmm(xs.astype(compute), dequantize_experts(w), group_sizes,
                              backend=route.backend, interpret=route.interpret,
                              out_dtype=jnp.float32)
    if not left_to_gspmd(w):
        return xla_gmm.gmm(xs.astype(compute), dequantize_experts(w), group_sizes,
                           preferred_element_type=jnp.float32)
    return jax.lax.ragged_dot(xs.astype(compute), dequantize_experts(w), group_sizes,
                              preferred_element_type=jnp.float32)


def _pallas_fits(w: PackedExperts, route: pallas_gmm.GmmRoute) -> bool:
    return qmm.layout_supported(w.in_features, w.out_features, bits=w.bits,
                                group_size=w.group_size, backend=route.backend)


def _pallas_quantized(xs: jax.Array, w: PackedExperts, group_sizes: jax.Array,
                      route: pallas_gmm.GmmRoute) -> jax.Array:
    """The Pallas GMM over the experts as stored (K_MAJOR: its layout, made at load),
    dequantized tile by tile in the kernel: each expert with rows read once, nothing
    rewritten."""
    xs = product.scheme_activations(xs, w).astype(jnp.dtype(w.compute_dtype))
    return pallas_gmm.gmm_quantized(xs, w.values, w.scales, w.offsets, group_sizes,
                                    bits=w.bits, group_size=w.group_size,
                                    zero_point=w.zero_point, backend=route.backend,
                                    interpret=route.interpret, out_dtype=jnp.float32)


def _pallas_route(w: PackedExperts, rows: int) -> pallas_gmm.GmmRoute | None:
    """The Pallas GMM route that multiplies these experts' stored arrays, or None. Experts
    the loader did not store in its layout (OUT_IN under a Pallas route: built outside
    loading/, or the route changed after load) are dequantized instead (_every_expert), with
    a log line: never relaid out in the step."""
    route = None if _uses_kernel(w) or rows < w.num_experts else pallas_gmm.gmm_route()
    if route is None or not _pallas_fits(w, route):
        return None
    if w.layout != K_MAJOR:
        _note_once(f"{w.kind} experts [{w.in_features}, {w.out_features}] reach the Pallas "
                   f"{route.backend} grouped matmul in the {w.layout} layout (not stored for "
                   "it at load: experts.stored_for_step): dequantized in the step instead")
        return None
    return route


_noted: set = set()


def _note_once(message: str) -> None:
    if message not in _noted:
        _noted.add(message)
        logger.warning("xla-inference: %s", message)


def ragged_product(xs: jax.Array, w: PackedExperts, group_sizes: jax.Array) -> jax.Array:
    """jax.lax.ragged_dot over quantized experts: xs [R, in], rows sorted by expert,
    group_sizes [E] -> [R, out] in xs's dtype, accumulated in float32 (the ways in the
    module docstring); rows past sum(group_sizes) zero, as ragged_dot's."""
    rows = xs.shape[0]
    route = _pallas_route(w, rows)
    if route is not None:
        return _pallas_quantized(xs, w, group_sizes, route).astype(xs.dtype)
    grouped_rows = jnp.sum(group_sizes)
    if _uses_kernel(w):
        y = (_kernel_rows(xs, w, row_experts(group_sizes, rows), grouped_rows)
             if rows < w.num_experts else _kernel_groups(xs, w, group_sizes))
    elif rows < w.num_experts:
        y = _gathered_rows(xs, w, row_experts(group_sizes, rows))
        y = jnp.where((jnp.arange(rows) < grouped_rows)[:, None], y, 0)  # ragged_dot's zeros
    else:
        y = _every_expert(xs, w, group_sizes)
    return y.astype(xs.dtype)


def expert_weights(w: jax.Array | PackedExperts, dtype) -> jax.Array:
    """Dense [E, in, out] experts for code that multiplies every expert (the reference
    path, layers/moe.moe_mlp_dense): quantized ones dequantized into `dtype`."""
    return dequantize_experts(w, dtype) if isinstance(w, PackedExperts) else w


# ------------------------------------------------------------------ shares of a mesh axis

def local_share(w: jax.Array | PackedExperts, split: str, axis: int, devices: int):
    """What one of `devices` devices holds of experts w (logical [E, in, out], dense or
    quantized) when `axis` is cut evenly among them (layers/moe.py's expert and tensor
    parallel): for dense experts the share's shape, for quantized ones w with the share's
    static sizes (in / out features, group size; the arrays are w's). None where the cut
    is uneven or the Pallas GMM cannot multiply the share alone: only the K-major layout
    splits its in or out axis (the native kernel's tiles and FP8's [out, in] split only
    by experts), a 4-bit split must keep whole 2H-input blocks, and an input split whole
    groups (or a single group: its scales then go whole to every device)."""
    if w.shape[axis] % devices:
        return None
    shape = list(w.shape)
    shape[axis] //= devices
    if not isinstance(w, PackedExperts):
        return jax.ShapeDtypeStruct(tuple(shape), w.dtype)
    if axis == 0:
        return w
    if w.layout != K_MAJOR:
        return None
    group = w.group_size
    if axis == 1:
        k = shape[1]
        one_group = w.in_features == w.group_size
        if not one_group and k % group:
            return None
        if w.kind == INT4 and (k % (2 * qmm.int4_half(w.in_features))
                               or qmm.int4_half(k) != qmm.int4_half(w.in_features)):
            return None
        group = k if one_group else group
    share = dataclasses.replace(w, in_features=shape[1], out_features=shape[2], group_size=group)
    route = pallas_gmm.gmm_route()
    return share if route is not None and _pallas_fits(share, route) else None


def share_splits_groups(w: PackedExperts, share: PackedExperts) -> bool:
    """Whether w's scales and offsets split as its values do for `share` (local_share):
    all but an input split of a single group, whose scales every device takes whole."""
    return share.in_features == w.in_features or w.in_features != w.group_size


# ------------------------------------------------------------------ read per host

def pack_experts_by_slice(quants: Sequence[GroupQuant],
                          compute_dtype="float32") -> PackedExperts | None:
    """Experts not read yet (quantization/sliced.QuantSlices: a multi-host process) -> a
    PackedExperts whose arrays read, when placement asks a device's slice, only the
    experts it holds and, of each, only its row tiles and input chunks or groups
    (packed.PackedSlices, stacked unread: ExpertSlices). None where the experts would not
    pack that way alike (another group size or zero point per expert, a layout packed from
    the whole weight): then pack_experts reads them whole."""
    quants = list(quants)
    if not quants or not all(reads_by_block(q) for q in quants):
        return None
    first = quants[0]
    alike = lambda q: (q.kind, q.shape, q.activations, q.has_offsets)  # noqa: E731 (reads nothing)
    if any(alike(q) != alike(first) for q in quants):
        return None
    each = [packed.pack(q, compute_dtype) for q in quants]
    names = ("values", "scales", "offsets")
    layout = lambda w: tuple(  # noqa: E731
        None if getattr(w, n) is None else (getattr(w, n).shape, getattr(w, n).dtype)
        for n in names) + (w.group_size, _zero_point(w), w.layout)
    if not all(getattr(w.values, "read_by_slice", False) is True for w in each) or len(
            {layout(w) for w in each}) > 1:
        return None
    first = each[0]
    stack = lambda name: ExpertSlices([getattr(w, name) for w in each])  # noqa: E731
    return PackedExperts(stack("values"), stack("scales"),
                         None if first.offsets is None else stack("offsets"), first.kind,
                         first.group_size, first.in_features, first.out_features,
                         first.activations, first.compute_dtype, _zero_point(first))


class ExpertSlices(LazyArray):
    """One array of every expert (each a packed.PackedSlices, not read yet), as the stack
    [E, ...] they make, stacked only where read: placement asks for each device's slice,
    so a process reads only its experts, and of each only its slice."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.shape = (len(self.parts), *self.parts[0].shape)
        self.dtype = np.dtype(self.parts[0].dtype)

    @property
    def nbytes(self) -> int:  # each expert's own (their scales' dtypes may differ)
        return sum(part.nbytes for part in self.parts)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        experts, rest = index[0], index[1:]
        if isinstance(experts, (int, np.integer)):
            return np.asarray(self.parts[experts][rest])
        rest = rest + (slice(None),) * (self.ndim - 1 - len(rest))
        return np.stack([self.parts[e][rest] for e in range(len(self.parts))[experts]])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return np.asarray(self).astype(dtype, copy=copy)

    def __repr__(self) -> str:
        return f"ExpertSlices({self.shape}, {self.dtype})"
