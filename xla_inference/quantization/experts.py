"""Quantized MoE experts as the device holds them (PackedExperts), and the grouped
("ragged") product over them that layers/moe.py runs.

A MoE block's experts are stacked [E, in, out], the layout jax.lax.ragged_dot multiplies
(and the dense experts' layout, so sharding is the same: experts split over the "model"
mesh axis). The quantized form keeps that layout for the integers and puts the groups on
the input axis:

    w[e, k, o] = values[e, k, o] * scales[e, k // group_size, o] + offsets[e, k // g, o]

values: INT8 int8 / FP8 float8_e4m3fn [E, in, out]; INT4 uint8 [E, in / 2, out], two
inputs per byte (input 2i in the low nibble, 2i + 1 in the high one).
scales, offsets: float32 [E, in / group_size, out]; offsets may be None.

They are made at load from each expert's host GroupQuant ([out, in], a quantized
checkpoint's `experts.{i}.gate_proj` etc.: `pack_experts`) or by online int8 / fp8
quantization of float experts, per expert and output channel (`quantize_experts`).

The product dequantizes inside the jitted step (XLA fuses what it can): every expert for
a large batch of rows, or, when there are fewer rows than experts (decode), only the
experts the rows were routed to, one weight gathered per row, so a step reads the
quantized bytes of the chosen experts only."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.quantization.groups import (FLOAT_ACTIVATIONS, INT4, INT8_ACTIVATIONS,
                                               GroupQuant, regroup)
from xla_inference.quantization.online import quantize_per_channel
from xla_inference.quantization.product import INT8_LEVELS, quantize_rows


def _static(**kwargs) -> dataclasses.Field:
    return dataclasses.field(metadata={"static": True}, **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedExperts:
    """E quantized [in, out] expert matrices (layout in the module docstring)."""

    values: jax.Array
    scales: jax.Array
    offsets: jax.Array | None
    kind: str = _static()
    group_size: int = _static()
    in_features: int = _static()
    out_features: int = _static()
    activations: str = _static(default=FLOAT_ACTIVATIONS)
    # The dtype the product dequantizes into (as PackedWeight.compute_dtype).
    compute_dtype: str = _static(default="float32")

    @property
    def num_experts(self) -> int:
        return self.values.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The logical [E, in, out] shape, that of the dense experts it replaces."""
        return (self.num_experts, self.in_features, self.out_features)

    @property
    def tiled(self) -> bool:
        """Never in the kernel's tile layout: every array is [E, in-like axis, out], so the
        weight's logical axes shard all three (parallel/sharding.packed_axes)."""
        return False

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in (self.values, self.scales, self.offsets) if a is not None)


# ------------------------------------------------------------------ on the host (numpy)

def _common_group_size(quants: Sequence[GroupQuant]) -> int:
    return math.gcd(*(q.group_size for q in quants))


def _check_alike(quants: Sequence[GroupQuant]) -> None:
    first = quants[0]
    for q in quants[1:]:
        if (q.kind, q.shape, q.activations, q.offsets is None) != (
                first.kind, first.shape, first.activations, first.offsets is None):
            raise ValueError(f"experts {first.name} and {q.name} are quantized differently "
                             f"({first.kind} {first.shape} vs {q.kind} {q.shape}, offsets or "
                             "activations); a MoE block's experts must share one scheme")


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """[E, in, out] integers in [0, 15] -> [E, in / 2, out] uint8, input 2i low."""
    if values.shape[1] % 2:
        raise ValueError(f"4-bit experts need an even input size, got {values.shape[1]}")
    v = values.astype(np.uint8)
    return np.ascontiguousarray(v[:, 0::2] | (v[:, 1::2] << 4))


def pack_experts(quants: Sequence[GroupQuant], compute_dtype="float32") -> PackedExperts:
    """Each expert's host GroupQuant ([out, in]) -> the stacked device layout (numpy
    arrays; placed by the engine). Experts with different group sizes share the largest
    group size that divides each (regroup: exact)."""
    quants = list(quants)
    _check_alike(quants)
    group = _common_group_size(quants)
    quants = [regroup(q, group) if q.group_size != group else q for q in quants]
    first = quants[0]
    out, inp = first.shape
    values = np.stack([q.values.T for q in quants])  # [E, in, out]
    if first.kind == INT4:
        values = _pack_nibbles(values)
    stack = lambda arrays: np.ascontiguousarray(np.stack([a.T for a in arrays]))  # noqa: E731
    offsets = None if first.offsets is None else stack([q.offsets for q in quants])
    return PackedExperts(np.ascontiguousarray(values), stack([q.scales for q in quants]),
                         offsets, first.kind, group, inp, out, first.activations,
                         jnp.dtype(compute_dtype).name)


def quantize_experts(weights: np.ndarray, kind: str) -> PackedExperts:
    """Online quantization of float experts [E, in, out]: each expert's every output
    channel to `kind` (INT8 or FP8) with one scale, as quantize_per_channel does a
    projection's rows."""
    weights = np.asarray(weights)
    return pack_experts([quantize_per_channel(weights[e].T, kind)
                         for e in range(weights.shape[0])])


def with_compute_dtype(experts: PackedExperts, compute_dtype) -> PackedExperts:
    return dataclasses.replace(experts, compute_dtype=jnp.dtype(compute_dtype).name)


# ------------------------------------------------------------------ on the device (jnp)

def _integer_values(values: jax.Array, kind: str) -> jax.Array:
    """[N, in(/2), out] stored values -> [N, in, out] (4-bit ones unpacked, as uint8)."""
    if kind != INT4:
        return values
    n, half, out = values.shape
    return jnp.stack([values & 15, values >> 4], axis=2).reshape(n, 2 * half, out)


def _dequantize(w: PackedExperts, values, scales, offsets, dtype) -> jax.Array:
    """Stored arrays of N experts (all of them, or one gathered per row) -> [N, in, out]."""
    q = _integer_values(values, w.kind).astype(jnp.float32)
    n = q.shape[0]
    q = q.reshape(n, w.num_groups, w.group_size, w.out_features)
    out = q * scales[:, :, None, :]
    if offsets is not None:
        out = out + offsets[:, :, None, :]
    return out.reshape(n, w.in_features, w.out_features).astype(dtype)


def dequantize_experts(w: PackedExperts, dtype=None) -> jax.Array:
    """Every expert's [in, out] weight: [E, in, out] in `dtype` (default w.compute_dtype)."""
    return _dequantize(w, w.values, w.scales, w.offsets, jnp.dtype(dtype or w.compute_dtype))


def _gathered(w: PackedExperts, experts: jax.Array) -> jax.Array:
    """The dequantized weights of `experts` [R] (indices): [R, in, out]."""
    pick = lambda a: None if a is None else jnp.take(a, experts, axis=0)  # noqa: E731
    return _dequantize(w, pick(w.values), pick(w.scales), pick(w.offsets),
                       jnp.dtype(w.compute_dtype))


def row_experts(group_sizes: jax.Array, rows: int) -> jax.Array:
    """The expert of each of `rows` rows sorted by expert ([E] rows per expert) -> [rows]."""
    ends = jnp.cumsum(group_sizes)
    expert = jnp.searchsorted(ends, jnp.arange(rows, dtype=ends.dtype), side="right")
    return jnp.minimum(expert, group_sizes.shape[0] - 1).astype(jnp.int32)


def _fake_quantized_rows(x: jax.Array) -> jax.Array:
    """x rounded per row to int8 levels (W8A8 int8 experts: dynamic per-token)."""
    xq, scale = quantize_rows(x, INT8_LEVELS)
    return xq.astype(jnp.float32) * scale[:, None]


def ragged_product(xs: jax.Array, w: PackedExperts, group_sizes: jax.Array) -> jax.Array:
    """jax.lax.ragged_dot over quantized experts: xs [R, in], rows sorted by expert,
    group_sizes [E] -> [R, out] in xs's dtype, accumulated in float32.

    With fewer rows than experts (a decode step) each row's expert is gathered and
    dequantized alone (reading the chosen experts' bytes only); otherwise every expert is
    dequantized and XLA's ragged_dot runs."""
    out_dtype = xs.dtype
    if w.activations == INT8_ACTIVATIONS:
        xs = _fake_quantized_rows(xs)
    compute = jnp.dtype(w.compute_dtype)
    rows = xs.shape[0]
    if rows < w.num_experts:
        weights = _gathered(w, row_experts(group_sizes, rows))  # [R, in, out]
        y = jnp.einsum("ri,rio->ro", xs.astype(compute), weights,
                       preferred_element_type=jnp.float32)
    else:
        y = jax.lax.ragged_dot(xs.astype(compute), dequantize_experts(w), group_sizes,
                               preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def expert_weights(w: jax.Array | PackedExperts, dtype) -> jax.Array:
    """Dense [E, in, out] experts for code that multiplies every expert (the reference
    path, layers/moe.moe_mlp_dense): quantized ones dequantized into `dtype`."""
    return dequantize_experts(w, dtype) if isinstance(w, PackedExperts) else w
