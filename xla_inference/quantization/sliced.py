"""Quantized weights read by the block (a multi-host process): a QuantSlices stands where a
GroupQuant would, but holds no arrays. It knows the weight's shape, kind, group size and
whether it has offsets (read from the checkpoint without reading a row of it), and reads
any block of rows and columns from the file on demand (`block`): quantization/packed.py
turns it into a PackedWeight whose arrays are read only where placement asks for a
device's slice, so each host reads about its devices' share of every sharded weight.

Anything else that touches its `values`, `scales` or `offsets` (a loader that dequantizes
it, MoE experts stacked at load, an embedding gathered as floats) reads it whole, once,
as a GroupQuant would have been: correct everywhere, economical where placement reads it.
Imports nothing of ours but groups.py."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from xla_inference.quantization.groups import GroupQuant, regroup

# read_block(rows, c0, c1, part) -> the GroupQuant of `rows` (a slice or an index array)
# and input columns [c0, c1), in any group size that the columns' range is made of; `part`
# VALUES or GROUPS: only that part need be right (a format that stores values and scales
# apart leaves the other zeros, unread); None: both.
BlockReader = Callable[[object, int, int, "str | None"], GroupQuant]
VALUES, GROUPS = "values", "groups"


class LazyArray:
    """What an array not read yet answers from its `shape` and `dtype` alone (the lazy
    tensors that placement reads by slice: loading/safetensors.CheckpointSlices,
    packed.PackedSlices, experts.ExpertSlices)."""

    read_by_slice = True  # what placement and pipeline stacks look for (parallel/sharding.place)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


class QuantSlices(GroupQuant):
    """A quantized [out, in] weight not read yet (see the module docstring)."""

    read_by_block = True  # what packed.pack looks for

    def __new__(cls, *args, **fields):
        # dataclasses.replace (regroup, take_rows of the base class) builds a GroupQuant
        # from every field: that is a plain, read GroupQuant.
        if "values" in fields:
            return GroupQuant(**fields)
        return super().__new__(cls)

    def __init__(self, read_block: BlockReader, shape: tuple[int, int], probe: GroupQuant,
                 rows: np.ndarray | None = None, parts_apart: bool = True,
                 half_groups: tuple[str, ...] = (), row_unit: int = 1):
        # `probe`: the weight's zero leading rows and every column, which the format's
        # reader checked like the whole (kind, group size, offsets, activations, name).
        self._read_block = read_block
        self._shape = (int(shape[0]), int(shape[1]))
        self._rows = rows  # stored row of each logical row (None: the same)
        # Whether read_block reads values and groups apart (safetensors: separate tensors);
        # else (GGUF: both in each block's bytes) one read serves both, kept until used.
        self._parts_apart = parts_apart
        self._whole: GroupQuant | None = None
        self._cache: dict[tuple, list] = {}
        self.kind, self.group_size = probe.kind, probe.group_size
        self.activations, self.name = probe.activations, probe.name
        self.has_offsets = probe.offsets is not None
        # "scales" and/or "offsets" whose every value the format stores as a float16 (GPTQ's
        # and AWQ's scales, GGUF Q4_0's d): packed in float16 as a whole read would (exact);
        # the rest float32, since only reading all of them could tell.
        self.half_groups = tuple(half_groups)
        # The rows one stored element spans (an FP8 block's side, GPTQ zero points packed
        # eight to a word): a block whose row edges are multiples of it is read by itself;
        # one that splits a unit reads the module whole and cuts (formats/slicing.py).
        self.row_unit = int(row_unit)

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    # ------------------------------------------------------------------ read whole

    def whole(self) -> GroupQuant:
        """The weight read whole (once), as a GroupQuant."""
        if self._whole is None:
            out, inp = self._shape
            self._whole = self.block(slice(0, out), 0, inp, self.group_size)
        return self._whole

    values = property(lambda self: self.whole().values)
    scales = property(lambda self: self.whole().scales)
    offsets = property(lambda self: self.whole().offsets)

    def __repr__(self) -> str:
        return (f"QuantSlices({self.name}: {self.kind} {self._shape}, groups of "
                f"{self.group_size}, not read)")

    # ------------------------------------------------------------------ read by block

    def block(self, rows: slice, c0: int, c1: int, group: int, part: str | None = None
              ) -> GroupQuant:
        """Logical rows `rows` (a slice) and input columns [c0, c1) in groups of `group`
        (which divides the weight's group size; c0 and c1 are multiples of it). `part`
        VALUES or GROUPS: only that part is wanted (a format that stores them apart reads
        only it; the other part returned is then not the weight's); None: both."""
        stored_rows = rows if self._rows is None else self._rows[rows]
        read = self._read_block(stored_rows, c0, c1, part)
        expected = (len(range(*rows.indices(self._shape[0]))), c1 - c0)
        if read.shape != expected:
            raise ValueError(f"{self.name}: a block read {read.shape}, expected {expected}")
        return read if read.group_size == group else regroup(read, group)

    def part_of_block(self, rows: slice, c0: int, c1: int, group: int, part: str, uses: int
                      ) -> GroupQuant:
        """block() for one part of a packed weight of `uses` arrays (values, scales and
        perhaps offsets each ask for their part): a block read for several of them (the
        groups, which scales and offsets both come from; both parts, where the format reads
        them at once) is kept until each has had it."""
        if self._parts_apart:
            if part == VALUES:
                return self.block(rows, c0, c1, group, VALUES)
            uses -= 1  # the groups serve the scales and offsets
        else:
            part = None
        key = (rows.start, rows.stop, c0, c1, group, part)
        entry = self._cache.get(key)
        if entry is None:
            entry = self._cache[key] = [self.block(rows, c0, c1, group, part), uses]
        entry[1] -= 1
        if entry[1] <= 0:
            del self._cache[key]
        return entry[0]

    def take_rows(self, rows) -> QuantSlices:
        """The same weight restricted to (or reordered by) `rows`, still unread (a fused
        projection's part, GGUF's rope row order)."""
        index = np.arange(self._shape[0])[rows] if self._rows is None else self._rows[rows]
        taken = object.__new__(QuantSlices)
        taken.__dict__.update(self.__dict__)
        taken._rows, taken._whole, taken._cache = np.asarray(index), None, {}
        taken._shape = (len(taken._rows), self._shape[1])
        return taken


def reads_by_block(weight) -> bool:
    return getattr(weight, "read_by_block", False) is True


def as_group_quant(weight):
    """A QuantSlices read whole (its GroupQuant); anything else as it is."""
    return weight.whole() if isinstance(weight, QuantSlices) else weight


def rows_as_slice_or_array(rows):
    """`rows` (a slice or an index array) as a slice where it is a contiguous run."""
    if isinstance(rows, slice):
        return rows
    rows = np.asarray(rows)
    if rows.size and np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size)):
        return slice(int(rows[0]), int(rows[0]) + rows.size)
    return rows if rows.size else slice(0, 0)

