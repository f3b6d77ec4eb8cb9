"""One block (rows x input columns) of a quantized module read from a safetensors
checkpoint, by the format's own reader: the reader runs unchanged over a view of the
checkpoint (BlockView) in which each of the module's tensors is cut to the part the block
needs, so a multi-host process reads from the files only its devices' share
(quantization/sliced.QuantSlices).

Each format says how its stored tensors follow the logical [out, in] weight (`rules`):
per stored axis, ("out", u) or ("in", u) where one stored element covers u logical rows
or columns (int4 packed eight to an int32 word: 8; a scale per group of g inputs: g; an
FP8 block scale: the block's side), or None (read whole: a per-channel scale's single
column, a per-tensor scale). A block whose edges do not fall on those units (rows that
split a packed word, columns that split a group) is read from the whole module and cut
(correct, not economical); placement's blocks are whole tiles and groups, so that is rare.
Imports nothing of ours above quantization/."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from xla_inference.quantization.formats import awq, compressed_tensors as ct, fp8, gptq
from xla_inference.quantization.formats.common import module_name
from xla_inference.quantization.groups import GroupQuant, regroup
from xla_inference.quantization.sliced import GROUPS, VALUES, QuantSlices

OUT, IN = "out", "in"
# The tensors that hold the values (read only when a block's values are wanted).
_VALUE_TENSORS = {"weight", "weight_packed", "qweight"}


def _rules(reader, prefix: str) -> dict[str, tuple] | None:
    """{tensor suffix: one entry per stored axis}; None: the module is not one we cut."""
    name = module_name(prefix)
    if reader.method == ct.METHOD:
        scheme = reader.scheme_for(name)
        if scheme is None:
            return None
        w = scheme.weights
        group = (IN, int(w.group_size)) if w.strategy == "group" else None
        if scheme.kind == ct.WNA16:
            per_word = 32 // w.num_bits
            return {"weight_packed": ((OUT, 1), (IN, per_word)),
                    "weight_scale": ((OUT, 1), group),
                    "weight_zero_point": ((OUT, per_word), group)}
        if w.strategy == "block":
            rows, cols = (int(b) for b in w.block_structure)
            scale = ((OUT, rows), (IN, cols))
        else:  # channel: [out, 1]; tensor: one value (read whole)
            scale = ((OUT, 1), None) if w.strategy == "channel" else None
        return {"weight": ((OUT, 1), (IN, 1)), "weight_scale": scale}
    if reader.method == gptq.METHOD:
        settings = reader._module_settings(name)
        if settings is None:
            return None
        per_word = 32 // settings.bits
        group = (IN, settings.group_size) if settings.group_size != -1 else None
        return {"qweight": ((IN, per_word), (OUT, 1)), "qzeros": (group, (OUT, per_word)),
                "scales": (group, (OUT, 1))}
    if reader.method == awq.METHOD:
        group = (IN, reader.group_size) if reader.group_size != -1 else None
        return {"qweight": ((IN, 1), (OUT, 8)), "qzeros": (group, (OUT, 8)),
                "scales": (group, (OUT, 1))}
    if reader.method == fp8.Fp8Reader.METHOD:
        block = reader.block
        return {"weight": ((OUT, 1), (IN, 1)), "weight_scale": ((OUT, 1), None),
                "weight_scale_inv": ((OUT, block[0]), (IN, block[1])) if block else None}
    return None


def _axis_index(entry, rows, cols: tuple[int, int], shape: tuple[int, int]):
    """The stored index along one axis for logical `rows` (slice or index array) and
    `cols` ([c0, c1)); None where the block's edges miss the axis' unit."""
    if entry is None:
        return slice(None)
    role, unit = entry
    if role == OUT and not isinstance(rows, slice):
        return rows if unit == 1 else None
    lo, hi = (rows.start, rows.stop) if role == OUT else cols
    full = shape[0] if role == OUT else shape[1]
    if lo % unit or (hi % unit and hi != full):
        return None
    return slice(lo // unit, -(-hi // unit))


class BlockView(Mapping):
    """The checkpoint as one module's block sees it: the module's tensors cut to the block
    (each read once, counted), the rest as stored. `part` VALUES: the scale and zero
    point tensors are zeros of their cut shape, never read; GROUPS: the value tensors are
    (a block wanted for its scales only); None: all are read."""

    def __init__(self, tensors: Mapping, prefix: str, rules: dict, rows, cols, shape,
                 part: str | None, count: Callable[[int], None], probe: bool):
        self._tensors, self._prefix, self._rules = tensors, prefix, rules
        self._rows, self._cols, self._shape = rows, cols, shape
        self._part, self._count = part, count
        # GPTQ's g_idx is checked once, by the probe (every column); a block has none.
        self._hidden = set() if probe else {prefix + "g_idx"}
        self._read: dict[str, np.ndarray] = {}
        self.aligned = all(self._index(s, np.shape(tensors[prefix + s])) is not None
                           for s in rules if prefix + s in tensors)

    def _index(self, suffix: str, shape: tuple[int, ...]):
        rule = self._rules.get(suffix) or ()
        index = tuple(self._axis(entry, dim) for entry, dim in zip(rule, shape))
        index += (slice(None),) * (len(shape) - len(index))
        return None if any(i is None for i in index) else index

    def _axis(self, entry, dim: int):
        # An axis whose length is not the logical one in its units does not follow it (a
        # per-tensor scale stored as [1] where a per-channel one would be [out]): whole.
        if entry is None:
            return slice(None)
        full = self._shape[0] if entry[0] == OUT else self._shape[1]
        if dim != -(-full // entry[1]):
            return slice(None)
        return _axis_index(entry, self._rows, self._cols, self._shape)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._hidden:
            raise KeyError(name)
        if name in self._read:
            return self._read[name]
        stored = self._tensors[name]
        suffix = name[len(self._prefix):] if name.startswith(self._prefix) else None
        if suffix is None or suffix not in self._rules and suffix != "weight_shape":
            return stored
        if suffix == "weight_shape":
            part = np.array([len(range(*self._row_range())), self._cols[1] - self._cols[0]])
        elif self._part == (GROUPS if suffix in _VALUE_TENSORS else VALUES):
            shape = np.broadcast_to(np.zeros((), stored.dtype), stored.shape)[
                self._index(suffix, stored.shape)].shape
            part = np.zeros(shape, stored.dtype)
        else:
            part = np.array(stored[self._index(suffix, stored.shape)])
            self._count(part.nbytes)
        self._read[name] = part
        return part

    def _row_range(self):
        rows = self._rows
        return (rows.start, rows.stop) if isinstance(rows, slice) else (0, len(rows))

    def __contains__(self, name: object) -> bool:
        return name in self._tensors and name not in self._hidden

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _row_count(rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else len(rows)


def sliced_weight(reader, tensors: Mapping, prefix: str, count: Callable[[int], None]
                  ) -> GroupQuant | None:
    """The module's weight as a QuantSlices (read by block), a GroupQuant where its format
    is not one we cut, None where the format leaves the module unquantized."""
    rules = _rules(reader, prefix)
    if rules is None:
        return reader.read_weight(tensors, prefix, None)

    def view(rows, cols, part, shape, probe=False):
        return BlockView(tensors, prefix, rules, rows, cols, shape, part, count, probe)

    probe_shape = _stored_shape(reader, tensors, prefix)
    if probe_shape is None or len(probe_shape) != 2:  # a norm's or a bias' weight
        return reader.read_weight(tensors, prefix, None)
    out, inp = probe_shape
    probe = reader.read_weight(view(slice(0, 0), (0, inp), None, probe_shape, probe=True),
                               prefix, (0, inp))
    if probe is None:
        return None
    probe.name = prefix + "weight"

    def read_block(rows, c0: int, c1: int, part: str | None) -> GroupQuant:
        block = view(rows, (c0, c1), part, (out, inp))
        if block.aligned:
            return reader.read_weight(block, prefix, (_row_count(rows), c1 - c0))
        whole = reader.read_weight(view(slice(0, out), (0, inp), part, (out, inp)), prefix,
                                   (out, inp))
        return cut(whole, rows, c0, c1)

    units = [entry[1] for suffix, rule in rules.items() if prefix + suffix in tensors
             for entry in (rule or ()) if entry is not None and entry[0] == OUT]
    return QuantSlices(read_block, (out, inp), probe, half_groups=_half_groups(reader, tensors,
                                                                             prefix),
                       row_unit=math.lcm(1, *units))


def _half_groups(reader, tensors: Mapping, prefix: str) -> tuple[str, ...]:
    """("scales",) where the module's scales are stored as float16 (then every packed
    scale is one exactly); offsets are computed (-z * s), so float32."""
    name = prefix + ("scales" if reader.method in (gptq.METHOD, awq.METHOD) else "weight_scale")
    stored = tensors[name] if name in tensors else None
    return ("scales",) if stored is not None and stored.dtype == np.float16 else ()


def cut(weight: GroupQuant, rows, c0: int, c1: int) -> GroupQuant:
    """Rows `rows` and input columns [c0, c1) of a GroupQuant read whole (its groups split
    where the columns need it: exact)."""
    group = math.gcd(weight.group_size, c0, c1)
    weight = weight if weight.group_size == group else regroup(weight, group)
    pick = lambda a: None if a is None else np.ascontiguousarray(a[rows][:, c0 // group:c1 // group])  # noqa: E731
    return GroupQuant(np.ascontiguousarray(weight.values[rows][:, c0:c1]), pick(weight.scales),
                      pick(weight.offsets), weight.kind, group, weight.activations, weight.name)


def _stored_shape(reader, tensors: Mapping, prefix: str) -> tuple[int, int] | None:
    """The module's logical [out, in], from its stored tensors' shapes (nothing read)."""
    shape_of = lambda s: tuple(np.shape(tensors[prefix + s])) if prefix + s in tensors else None  # noqa: E731
    if reader.method == ct.METHOD:
        if prefix + "weight_shape" in tensors:
            return tuple(int(v) for v in np.asarray(tensors[prefix + "weight_shape"]).reshape(-1))
        return shape_of("weight")
    if reader.method == gptq.METHOD:
        stored = shape_of("qweight")
        settings = reader._module_settings(module_name(prefix))
        return None if stored is None else (stored[1], stored[0] * 32 // settings.bits)
    if reader.method == awq.METHOD:
        stored = shape_of("qweight")
        return None if stored is None else (stored[1] * 8, stored[0])
    return shape_of("weight")
