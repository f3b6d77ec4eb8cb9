"""A decode step's quantized weights named by address, not passed as arrays.

Every array an XLA program takes costs the host's jit call ~1.5-3 us each step (its
signature, layout and PjRt's argument preparation), and a quantized weight is three arrays
(values, scales, offsets): SmolLM2's GGUF passes 694, and in a 2-core server the GGUF decode
step's jit call was three quarters of the engine thread's time, taken from the spare core's
share of the products (benchmarks/RESULTS.md, 2026-12-04 second session). On the host CPU,
where a placed array is host memory at a fixed address, the steps that only the native
kernel's one-row entries multiply (fewer rows than the wide entry takes) name each such
weight by its row of one small table instead (kernels/cpu_quantized.TableWeight); the
engine keeps the arrays alive and unchanged for as long as its programs run."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from xla_inference.kernels import cpu_quantized
from xla_inference.kernels.cpu_quantized import TableWeight
from xla_inference.quantization.packed import PackedWeight
from xla_inference.quantization.product import KERNEL_MAX_ROWS, wide_kernel_min_rows


def max_rows() -> int:
    """The most tokens of a step that may name its weights by address: every quantized
    product of such a step runs the kernel's one-row entries (product.uses_kernel), none the
    wide one (product.wide_kernel_min_rows). Needs cpu_quantized.available()."""
    fewest_wide = wide_kernel_min_rows()
    return KERNEL_MAX_ROWS if fewest_wide is None else min(KERNEL_MAX_ROWS, fewest_wide - 1)


@dataclasses.dataclass
class WeightTable:
    """params with each native-kernel weight's arrays replaced by TableWeights (rows of
    `table`, uint8 [rows, 8 * TABLE_COLUMNS], which they do not hold yet: attach); `arrays`
    holds what the rows point at."""

    params: object
    table: np.ndarray
    arrays: list


def detach(params) -> WeightTable | None:
    """The WeightTable of `params` (placed on the one host CPU device), or None where no weight
    is in the native kernel's tiles."""
    rows, arrays = [], []

    def by_address(w):
        if not isinstance(w, PackedWeight) or not w.tiled:
            return w
        row, held = cpu_quantized.table_row(w.values, w.scales, w.offsets)
        index = len(rows)
        rows.append(row)
        arrays.append(held)

        def ref(a):
            return None if a is None else TableWeight(index, tuple(a.shape), np.dtype(a.dtype))

        return dataclasses.replace(w, values=ref(w.values), scales=ref(w.scales),
                                   offsets=ref(w.offsets))

    detached = jax.tree.map(by_address, params, is_leaf=lambda x: isinstance(x, PackedWeight))
    if not rows:
        return None
    table = np.ascontiguousarray(np.stack(rows)).view(np.uint8).reshape(len(rows), -1)
    return WeightTable(detached, table, arrays)


def attach(params, table):
    """detach's params with every TableWeight holding `table` (inside the step's trace: the
    program's table argument)."""
    def with_table(w):
        return dataclasses.replace(w, table=table) if isinstance(w, TableWeight) else w

    return jax.tree.map(with_table, params, is_leaf=lambda x: isinstance(x, TableWeight))
