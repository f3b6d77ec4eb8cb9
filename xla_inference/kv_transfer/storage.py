"""KV of a prompt as a file in a directory two engines share: the name is a hash of the
model and the prompt's token ids, the content every cache array's rows for the prompt's
tokens (runner/kv_pages.py's values), with a header that the reader checks against its own
cache. Plain numpy: no vllm, no torch, no JAX.

An engine over several JAX processes writes one file per process (`<key>.p<i>of<n>`), each
its KV heads of every token, with that share (runner/kv_pages.ProcessShare) in the header;
a reader whose share differs is refused naming both."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

FORMAT = "xla-inference-kv/1"
SUFFIX = ".kv.npz"


def prompt_key(model: str, token_ids, context: tuple[str, ...] = ()) -> str:
    """The file name's stem for a model's prompt. context: whatever else makes the prompt's
    KV differ for the same tokens (its LoRA adapter, its images, a cache salt), as strings;
    none for a plain prompt."""
    digest = hashlib.sha256(model.encode() + b"\0")
    digest.update(np.asarray(token_ids, np.int64).tobytes())
    for part in context:
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()


def path_for(directory: str | Path, key: str, share=None) -> Path:
    """The file of a prompt's KV; with a ProcessShare, that process's file."""
    if share is None:
        return Path(directory) / f"{key}{SUFFIX}"
    return Path(directory) / f"{key}.p{share.process_index}of{share.process_count}{SUFFIX}"


def process_count_of(path: Path) -> int:
    """How many processes wrote the prompt `path` is one file of (1: a one-process file)."""
    stem = path.name[:-len(SUFFIX)]
    _, _, part = stem.partition(".p")
    return int(part.partition("of")[2]) if part else 1


def stored_files(directory: str | Path, key: str) -> list[Path]:
    """Every file of a prompt's KV, whoever wrote it."""
    return sorted(Path(directory).glob(f"{key}*{SUFFIX}"))


def is_stored(directory: str | Path, key: str, process_count: int,
              other_layouts: bool = True) -> bool:
    """Whether an engine of `process_count` processes may try to load a prompt: every file
    of its own layout is there, or (other_layouts) a file of another layout is (its load
    then fails naming both layouts, rather than the prompt being recomputed silently)."""
    files = stored_files(directory, key)
    if process_count == 1:
        own = {path_for(directory, key)}
    else:
        own = {Path(directory) / f"{key}.p{i}of{process_count}{SUFFIX}"
               for i in range(process_count)}
    return own <= set(files) or (other_layouts and any(process_count_of(f) != process_count
                                                       for f in files))


def _share_header(share) -> dict | None:
    if share is None:
        return None
    return dict(process=share.process_index, processes=share.process_count,
                heads=[list(h) for h in share.heads])


def describe_share(header_share: dict | None) -> str:
    """A share as a file header records it, in words."""
    if header_share is None:
        return "one process (every KV head)"
    ranges = ", ".join(f"[{a}, {b}) of {t}" for a, b, t in header_share["heads"])
    return (f"process {header_share['process']} of {header_share['processes']} (KV heads "
            f"{ranges} of each cache set)")


def save(path: Path, values: list[tuple[np.ndarray, ...]], share=None) -> int:
    """Write `values` (per set of cache arrays, K and V [n, heads, head size]; with a
    ProcessShare, that process's heads) to `path` atomically: readers see the whole file or
    none. -> bytes written."""
    num_tokens = len(values[0][0]) if values and values[0] else 0
    header = dict(format=FORMAT, num_tokens=num_tokens, share=_share_header(share),
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


def read_header(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return json.loads(data["header"].tobytes())


def _refuse_other_layout(path: Path, share) -> None:
    """This process's file is missing: name the layout the prompt was written in instead,
    when one is there."""
    others = [f for f in stored_files(path.parent, path.name[:-len(SUFFIX)].split(".")[0])
              if f != path]
    if not others:
        raise FileNotFoundError(f"{path}: no such KV file")
    written = "; ".join(sorted({describe_share(read_header(f).get("share")) for f in others}))
    raise ValueError(f"the KV of this prompt in {path.parent} was written by an engine of "
                     f"another layout ({written}); this reader is "
                     f"{describe_share(_share_header(share))}: not loaded")


def load(path: Path, layout, start: int, end: int, share=None) -> list[tuple[np.ndarray, ...]]:
    """Tokens [start, end) of the file's values, checked against `layout` (per set of cache
    arrays: num_arrays, num_kv_heads, head_size, dtype; runner/kv_pages.ArraySetLayout) and
    `share` (this process's part across several JAX processes, or None for one).
    Raises ValueError naming what differs."""
    if not path.exists():
        _refuse_other_layout(path, share)
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(data["header"].tobytes())
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a KV file of format {FORMAT}")
        if header.get("share") != _share_header(share):
            raise ValueError(f"{path} was written by {describe_share(header.get('share'))}; "
                             f"this reader is {describe_share(_share_header(share))}: not "
                             "loaded")
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
