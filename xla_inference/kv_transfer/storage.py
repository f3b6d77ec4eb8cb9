"""KV of a prompt as a file in a directory two engines share: the name is a hash of the
model and the prompt's token ids, the content every cache array's rows for the prompt's
tokens (runner/kv_pages.py's values), with a header that the reader checks against its own
cache. Plain numpy: no vllm, no torch, no JAX."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

FORMAT = "xla-inference-kv/1"
SUFFIX = ".kv.npz"


def prompt_key(model: str, token_ids) -> str:
    """The file name's stem for a model's prompt."""
    digest = hashlib.sha256(model.encode() + b"\0")
    digest.update(np.asarray(token_ids, np.int64).tobytes())
    return digest.hexdigest()


def path_for(directory: str | Path, key: str) -> Path:
    return Path(directory) / f"{key}{SUFFIX}"


def save(path: Path, values: list[tuple[np.ndarray, ...]]) -> int:
    """Write `values` (per set of cache arrays, K and V [n, heads, head size]) to `path`
    atomically: readers see the whole file or none. -> bytes written."""
    num_tokens = len(values[0][0]) if values and values[0] else 0
    header = dict(format=FORMAT, num_tokens=num_tokens,
                  sets=[[[list(a.shape[1:]), str(a.dtype)] for a in arrays] for arrays in values])
    arrays = {f"s{s}_{i}": np.ascontiguousarray(a).view(np.uint8)
              for s, set_values in enumerate(values) for i, a in enumerate(set_values)}
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(buffer.getvalue())
    os.replace(partial, path)
    return buffer.tell()


def load(path: Path, layout, start: int, end: int) -> list[tuple[np.ndarray, ...]]:
    """Tokens [start, end) of the file's values, checked against `layout` (per set of cache
    arrays: num_arrays, num_kv_heads, head_size, dtype; runner/kv_pages.ArraySetLayout).
    Raises ValueError naming what differs."""
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(data["header"].tobytes())
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a KV file of format {FORMAT}")
        if end > header["num_tokens"]:
            raise ValueError(f"{path} holds {header['num_tokens']} tokens; {end} wanted")
        want = [[[[s.num_kv_heads, s.head_size], str(s.dtype)]] * s.num_arrays for s in layout]
        if header["sets"] != want:
            raise ValueError(f"{path} was written by a cache of layout {header['sets']}; this "
                             f"cache is {want}")
        out = []
        for s, set_layout in enumerate(layout):
            row = set_layout.num_kv_heads * set_layout.head_size * set_layout.dtype.itemsize
            out.append(tuple(
                data[f"s{s}_{i}"].reshape(header["num_tokens"], row)[start:end].reshape(-1)
                .view(set_layout.dtype).reshape(end - start, set_layout.num_kv_heads,
                                                set_layout.head_size)
                for i in range(set_layout.num_arrays)))
        return out
