"""A small safetensors reader (memory-mapped numpy arrays; no torch, bfloat16 included), and
checkpoint tensors read slice by slice (CheckpointSlices): a multi-host process reads from
the files only the parts of each tensor its own devices hold."""

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from xla_inference.quantization.sliced import LazyArray

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

    Anything else numpy does with it (np.asarray, arithmetic, a reshape: a loader or a
    transform that needs the whole tensor) reads it whole, as a plain array would be."""

    def __init__(self, stored: np.ndarray, dtype, counter: ReadCounter = CHECKPOINT_READS):
        self._stored = stored
        self.dtype = np.dtype(dtype)
        self.shape = tuple(stored.shape)
        self._counter = counter

    def astype(self, dtype, copy: bool = True) -> "CheckpointSlices":
        """The same stored tensor, to be read in `dtype` (still unread)."""
        return CheckpointSlices(self._stored, dtype, self._counter)

    def __getitem__(self, index) -> np.ndarray:
        part = np.array(self._stored[index])  # copies just the slice out of the map
        self._counter.add(part.nbytes)
        return part.astype(self.dtype, copy=False)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[...]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = [np.asarray(x) if isinstance(x, CheckpointSlices) else x for x in inputs]
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __getattr__(self, name):
        # What a plain array offers beyond the above (reshape, T, ...): on the whole tensor.
        # Anything else is no attribute (a probe for one must not read the tensor).
        if name.startswith("_") or not hasattr(np.ndarray, name):
            raise AttributeError(name)
        return getattr(np.asarray(self), name)

    def __repr__(self) -> str:
        return f"CheckpointSlices(shape={self.shape}, dtype={self.dtype})"


class ExpertStackSlices(CheckpointSlices):
    """MoE experts not read yet: each expert's checkpoint tensor [out, in] (HF layout), as
    the stack [E, in, out] the MoE layer takes (layers/moe.MoeMlp). `self[index]` reads,
    per expert the index holds, only its [out, in] block that the index's (in, out) slice
    covers, then transposes and stacks it. So a process whose devices hold some experts
    (expert parallel) reads only those experts' tensors, and one whose devices hold a
    width slice of every expert (the MLP width split) reads only those rows or columns of
    each. Anything else (np.asarray, a reshape) reads the whole stack, as before."""

    def __init__(self, experts: list[np.ndarray], dtype, counter: ReadCounter = CHECKPOINT_READS):
        out_dim, in_dim = experts[0].shape
        self._experts = list(experts)
        self.dtype = np.dtype(dtype)
        self.shape = (len(experts), in_dim, out_dim)
        self._counter = counter

    def astype(self, dtype, copy: bool = True) -> "ExpertStackSlices":
        return ExpertStackSlices(self._experts, dtype, self._counter)

    def __getitem__(self, index) -> np.ndarray:
        slices, dropped = _as_slices(index, self.shape)
        experts, inputs, outputs = slices
        blocks = []
        for e in range(self.shape[0])[experts]:
            block = np.array(self._experts[e][outputs, inputs])  # copies just the block
            self._counter.add(block.nbytes)
            blocks.append(block.astype(self.dtype, copy=False).T)
        stack = (np.stack(blocks) if blocks else
                 np.zeros((0, *self.shape[1:]), self.dtype)[:, inputs, outputs])
        stack = np.ascontiguousarray(stack)
        return stack.reshape([n for axis, n in enumerate(stack.shape) if axis not in dropped])

    def __repr__(self) -> str:
        return f"ExpertStackSlices(shape={self.shape}, dtype={self.dtype})"


def _as_slices(index, shape: tuple[int, ...]) -> tuple[list[slice], set[int]]:
    """A basic numpy index of an array of `shape` -> one slice per axis, and the axes an
    integer index drops (read as one-element slices, then squeezed)."""
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
        else:
            raise TypeError(f"an expert stack read by slice takes basic indices, not {i!r}")
    return slices, dropped
