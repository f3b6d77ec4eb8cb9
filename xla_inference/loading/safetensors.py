"""A small safetensors reader (memory-mapped numpy arrays; no torch, bfloat16 included), and
checkpoint tensors read slice by slice (CheckpointSlices): a multi-host process reads from
the files only the parts of each tensor its own devices hold."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from xla_inference.quantization.sliced import LazyArray, reads_by_block, rows_as_slice_or_array

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, as read-only views of a memory map."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        raw = data[start:end]
        tensors[name] = raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint files of a HF model directory: one file, or the shards an index names."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    return files


class CheckpointTensors(Mapping):
    """name -> array over every shard of a checkpoint, each file mapped once.

    `reads_slices`: loading/params.take_tensor hands a tensor it passes on unchanged (no
    transpose, no dequantization) to the parameter tree as a CheckpointSlices, read only
    where placement asks for a device's slice (parallel/sharding.place)."""

    def __init__(self, files: list[Path], reads_slices: bool = False):
        self._tensors: dict[str, np.ndarray] = {}
        self.reads_slices = reads_slices
        for f in files:
            self._tensors.update(read_safetensors(f))

    def __getitem__(self, name: str) -> np.ndarray:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class ReadCounter:
    """Bytes copied out of checkpoint files by CheckpointSlices reads (in the file's dtype),
    for the load log and the tests: a multi-host process reads its devices' share."""

    def __init__(self):
        self.bytes = 0

    def add(self, nbytes: int) -> None:
        self.bytes += nbytes


CHECKPOINT_READS = ReadCounter()


class CheckpointSlices(np.lib.mixins.NDArrayOperatorsMixin, LazyArray):
    """A checkpoint tensor not read yet, as the parameter tree holds it until placement:
    shape, the dtype it will be read in, and `self[index]` reading only that slice of the
    file (a memory map: the pages it spans) and casting it. Placement
    (parallel/sharding.place) asks for each of this process's devices' slices, so a process
    copies from the files only what its devices hold.

    A loader may see the stored tensor through a transpose (`transpose`, `T`: an [out, in]
    weight taken [in, out]), a split of axes (`reshape` into more axes: [N * H, D] as
    [N, H, D] per head) and a selection along axes (`select`: a fused tensor's part, MLA's
    key rows of each head, rope dims reordered), and stays unread: each view axis keeps the
    stored axis it walks and the stored offset of each of its elements, so `self[index]`
    reads just the stored elements the index covers (a gather where they are not one run)
    and lays them out as the view.

    Anything else numpy does with it (np.asarray, arithmetic, a reshape that merges axes: a
    loader or a transform that needs the whole tensor) reads it whole, as a plain array
    would be."""

    def __init__(self, stored: np.ndarray, dtype, counter: ReadCounter = CHECKPOINT_READS):
        # `stored`: an array (a memory map's view), a StoredStack, or a quantized [out, in]
        # weight not read yet (quantization/sliced.QuantSlices), read dequantized by block.
        self._stored = stored
        self.dtype = np.dtype(dtype)
        self.shape = tuple(stored.shape)
        self._counter = counter
        # Per view axis (stored axis, offsets [n] into it); None: the stored array as it is.
        # A stored element's index along an axis is the sum of its view axes' offsets.
        self._axes: list[tuple[int, np.ndarray]] | None = None
        if not isinstance(stored, np.ndarray):
            self._axes = self._axis_map()

    def _view(self, axes: list[tuple[int, np.ndarray]]) -> CheckpointSlices:
        view = object.__new__(CheckpointSlices)
        view.__dict__.update(self.__dict__)
        view._axes = axes
        view.shape = tuple(len(offsets) for _, offsets in axes)
        return view

    def _axis_map(self) -> list[tuple[int, np.ndarray]]:
        if self._axes is not None:
            return self._axes
        return [(axis, np.arange(n)) for axis, n in enumerate(self._stored.shape)]

    def astype(self, dtype, copy: bool = True) -> CheckpointSlices:
        """The same stored tensor, to be read in `dtype` (still unread)."""
        same = object.__new__(type(self))
        same.__dict__.update(self.__dict__)
        same.dtype = np.dtype(dtype)
        return same

    # ------------------------------------------------------------------ views, unread

    def transpose(self, *axes) -> CheckpointSlices:
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        order = list(axes) if axes else list(range(self.ndim))[::-1]
        mapping = self._axis_map()
        return self._view([mapping[a] for a in order])

    @property
    def T(self) -> CheckpointSlices:
        return self.transpose()

    def select(self, index) -> CheckpointSlices:
        """self[index], unread: `index` takes slices or 1-D integer arrays per axis (and an
        Ellipsis), keeping every axis."""
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, (int, np.integer)) for i in index):
            raise TypeError("select keeps every axis: take a one-element slice, not an integer")
        if any(i is Ellipsis for i in index):
            at = next(k for k, i in enumerate(index) if i is Ellipsis)
            index = index[:at] + (slice(None),) * (self.ndim - len(index) + 1) + index[at + 1:]
        index = index + (slice(None),) * (self.ndim - len(index))
        return self._view([(axis, offsets[i]) for (axis, offsets), i
                           in zip(self._axis_map(), index)])

    def reshape(self, *shape):
        """A reshape that splits axes (each into consecutive ones whose sizes multiply to
        it, over stored elements evenly spaced, as any axis not reordered is) stays
        unread; any other reads the tensor whole."""
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        shape = _with_inferred(tuple(int(n) for n in shape), self.size)
        axes = _split_axes(self._axis_map(), shape)
        if axes is None:
            return np.asarray(self).reshape(shape)
        return self._view(axes)

    # ------------------------------------------------------------------ reads

    def __getitem__(self, index) -> np.ndarray:
        if self._axes is None:
            part = np.array(self._stored[index])  # copies just the slice out of the map
            self._counter.add(part.nbytes)
            return part.astype(self.dtype, copy=False)
        slices, dropped = _as_slices(index, self.shape)
        picked = [(axis, offsets[i]) for (axis, offsets), i in zip(self._axes, slices)]
        stored_index, sizes, order = [], [], []
        for axis in range(self._stored.ndim):
            mine = [v for v, (a, _) in enumerate(picked) if a == axis]
            offsets = np.zeros((), np.int64)
            for v in mine:  # the outer sum, earlier view axes outer
                offsets = offsets[..., None] + picked[v][1]
            stored_index.append(rows_as_slice_or_array(offsets.reshape(-1)))
            sizes += [len(picked[v][1]) for v in mine]
            order += mine
        block = gather(self._stored, tuple(stored_index))
        if not reads_by_block(self._stored):  # a quantized weight's reads count themselves
            self._counter.add(block.nbytes)
        block = block.reshape(sizes).transpose(np.argsort(order)).astype(self.dtype, copy=False)
        block = np.ascontiguousarray(block)
        return block.reshape([n for axis, n in enumerate(block.shape) if axis not in dropped])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[...]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = [np.asarray(x) if isinstance(x, CheckpointSlices) else x for x in inputs]
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __getattr__(self, name):
        # What a plain array offers beyond the above (swapaxes, ...): on the whole tensor.
        # Anything else is no attribute (a probe for one must not read the tensor).
        if name.startswith("_") or not hasattr(np.ndarray, name):
            raise AttributeError(name)
        return getattr(np.asarray(self), name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


class StoredStack:
    """Stored tensors of one shape (a MoE layer's experts, one tensor each) as one stored
    tensor [n, ...] that `gather` reads: only the tensors and blocks an index covers."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = list(parts)
        self.shape = (len(self.parts), *self.parts[0].shape)
        self.ndim = len(self.shape)
        self.dtype = self.parts[0].dtype


def gather(stored, index: tuple) -> np.ndarray:
    """A copy of stored[index] (index: a slice or a 1-D integer array per axis, each array
    taking just its elements), from a memory map: only what it covers is read."""
    if reads_by_block(stored):
        return _dequantized_block(stored, *index)
    if isinstance(stored, StoredStack):
        first, rest = index[0], index[1:]
        chosen = range(len(stored.parts))[first] if isinstance(first, slice) else first
        blocks = [gather(stored.parts[int(e)], rest) for e in chosen]
        if blocks:
            return np.stack(blocks)
        sizes = [len(range(n)[i]) if isinstance(i, slice) else len(i)
                 for n, i in zip(stored.shape[1:], rest)]
        return np.zeros((0, *sizes), stored.dtype)
    if sum(not isinstance(i, slice) for i in index) <= 1:  # one array keeps its axis' place
        return np.array(stored[index])
    return np.array(stored[np.ix_(*[np.arange(n)[i] if isinstance(i, slice) else i
                                    for n, i in zip(stored.shape, index)])])


def _dequantized_block(weight, rows, cols) -> np.ndarray:
    """Rows and columns of a quantized [out, in] weight not read yet (QuantSlices), as
    float32. The rows are read as runs of whole row units (weight.row_unit: an FP8 block's
    side; 1 for most formats), each with the whole groups that hold the columns, so a
    format reads each run by itself; dequantized (elementwise: the whole weight's values)
    and cut."""
    out, inp = weight.shape
    rows = np.arange(out)[rows] if isinstance(rows, slice) else np.asarray(rows, np.int64)
    cols = np.arange(inp)[cols] if isinstance(cols, slice) else np.asarray(cols, np.int64)
    if not rows.size or not cols.size:
        return np.zeros((rows.size, cols.size), np.float32)
    group, unit = weight.group_size, getattr(weight, "row_unit", 1)
    c0, c1 = int(cols.min()) // group * group, min(-(-(int(cols.max()) + 1) // group) * group, inp)
    units = np.unique(rows // unit)
    runs = np.split(units, np.flatnonzero(np.diff(units) > 1) + 1)
    starts = np.array([int(run[0]) * unit for run in runs])
    stops = np.minimum([(int(run[-1]) + 1) * unit for run in runs], out)
    blocks = [weight.block(slice(int(lo), int(hi)), c0, c1, group).dequantize(np.float32)
              for lo, hi in zip(starts, stops)]
    at = np.concatenate([[0], np.cumsum(stops - starts)[:-1]])  # each run's first row
    run = np.searchsorted(starts, rows, side="right") - 1
    return np.concatenate(blocks)[np.ix_(at[run] + rows - starts[run], cols - c0)]


def _with_inferred(shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    if -1 not in shape:
        return shape
    known = int(np.prod([n for n in shape if n != -1]))
    return tuple(size // known if n == -1 else n for n in shape)


def _split_axes(axes: list[tuple[int, np.ndarray]], shape: tuple[int, ...]):
    """The view axes after a reshape to `shape` that splits each axis into consecutive ones
    (None for any other reshape, or an axis whose offsets are not evenly spaced)."""
    if int(np.prod(shape)) != int(np.prod([len(o) for _, o in axes])):
        return None
    new, at = [], 0
    for stored_axis, offsets in axes:
        n, group = len(offsets), []
        while at < len(shape) and (not group or int(np.prod(group)) < n):
            group.append(shape[at])
            at += 1
        if int(np.prod(group)) != n:
            return None
        step = int(offsets[1] - offsets[0]) if n > 1 else 1
        if n > 1 and not np.array_equal(np.diff(offsets), np.full(n - 1, step)):
            return None
        start = int(offsets[0]) if n else 0
        for k, size in enumerate(group):
            inner = int(np.prod(group[k + 1:]))
            new.append((stored_axis, (start if k == 0 else 0) + step * inner * np.arange(size)))
    return new if at == len(shape) else None


class ExpertStackSlices(CheckpointSlices):
    """MoE experts not read yet: each expert's checkpoint tensor [out, in] (HF layout), as
    the stack [E, in, out] the MoE layer takes (layers/moe.MoeMlp): the per-expert tensors
    as one stored [E, out, in] (StoredStack), transposed. `self[index]` reads, per expert
    the index holds, only its [out, in] block that the index's (in, out) slice covers. So
    a process whose devices hold some experts (expert parallel) reads only those experts'
    tensors, and one whose devices hold a width slice of every expert (the MLP width
    split) reads only those rows or columns of each. Anything else (np.asarray, a merging
    reshape) reads the whole stack, as before."""

    def __init__(self, experts: list[np.ndarray], dtype, counter: ReadCounter = CHECKPOINT_READS):
        super().__init__(StoredStack(experts), dtype, counter)
        E, out_dim, in_dim = self._stored.shape
        self._axes = [(0, np.arange(E)), (2, np.arange(in_dim)), (1, np.arange(out_dim))]
        self.shape = (E, in_dim, out_dim)


def _as_slices(index, shape: tuple[int, ...]) -> tuple[list, set[int]]:
    """A basic numpy index of an array of `shape`, or one with a single 1-D integer array
    (which keeps its axis' place, as numpy's) -> one slice (or that array) per axis, and the
    axes an integer index drops (read as one-element slices, then squeezed)."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = next(k for k, i in enumerate(index) if i is Ellipsis)
        fill = (slice(None),) * (len(shape) - len(index) + 1)
        index = index[:at] + fill + index[at + 1:]
    index = index + (slice(None),) * (len(shape) - len(index))
    slices, dropped = [], set()
    for axis, i in enumerate(index):
        if isinstance(i, slice):
            slices.append(i)
        elif isinstance(i, (int, np.integer)):
            i = int(i) % shape[axis]
            slices.append(slice(i, i + 1))
            dropped.add(axis)
        elif np.ndim(i) == 1 and np.asarray(i).dtype.kind in "iu" and not any(
                isinstance(j, np.ndarray) for j in slices):
            slices.append(np.asarray(i))
        else:
            raise TypeError(f"a checkpoint view read by slice takes basic indices and one 1-D "
                            f"integer array, not {i!r}")
    return slices, dropped
