"""The host tier of KV cache offload: pages of the device cache kept in host memory, in a
fixed number of chunks (each `blocks_per_chunk` pages) that vLLM's offloading manager
hands out and evicts (least recently used first) on the scheduler side. This side only
copies: pages of the donated device cache out to chunk rows and back, through the jitted
gather/scatter programs of runner/kv_pages.py (`pages` is an EnginePages: read_tokens,
write_tokens, layout, block_size). Plain numpy over those programs: no vllm, no torch.

A chunk's rows are allocated zeroed (the OS commits host memory as chunks are written) and,
with `path`, in a file of that directory instead (np.memmap: the kernel may page the tier
out to disk, so a tier larger than the host's free memory still fits)."""

from __future__ import annotations

import os
import tempfile

import numpy as np


def host_pages(chunk_ids, blocks_per_chunk: int, skip: int, count: int) -> np.ndarray:
    """The host pages a transfer of `count` device pages uses: the chunks' pages in order,
    less the first `skip` (a run that starts inside its first chunk: vLLM's block index
    modulo blocks_per_chunk)."""
    chunk_ids = np.asarray(chunk_ids, np.int64)
    pages = (chunk_ids[:, None] * blocks_per_chunk + np.arange(blocks_per_chunk)).ravel()
    if skip + count > len(pages):
        raise ValueError(f"{count} pages from page {skip} of {len(chunk_ids)} chunks of "
                         f"{blocks_per_chunk} pages: the chunks hold {len(pages)}")
    return pages[skip:skip + count]


def page_bytes(layout, block_size: int) -> int:
    """Bytes of one page over every cache array (all layers, K and V)."""
    return block_size * sum(s.num_arrays * s.num_kv_heads * s.head_size * s.dtype.itemsize
                            for s in layout)


class HostPageStore:
    """num_chunks x blocks_per_chunk pages of KV in host memory, per cache array."""

    def __init__(self, layout, block_size: int, num_chunks: int, blocks_per_chunk: int,
                 path: str | None = None):
        self.layout, self.block_size = list(layout), block_size
        self.num_chunks, self.blocks_per_chunk = num_chunks, blocks_per_chunk
        self.num_pages = num_chunks * blocks_per_chunk
        self._file = None
        rows = self.num_pages * block_size
        if path is None:
            self.rows = [tuple(np.zeros((rows, s.num_kv_heads, s.head_size), s.dtype)
                               for _ in range(s.num_arrays)) for s in self.layout]
        else:
            self.rows = self._file_rows(path, rows)

    def _file_rows(self, directory: str, rows: int) -> list[tuple[np.ndarray, ...]]:
        """The rows as views of one file in `directory`, unlinked at once: it lives while
        this store does and never outlives the process."""
        os.makedirs(directory, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=directory)
        self._file.truncate(self.num_pages * page_bytes(self.layout, self.block_size))
        out, offset = [], 0
        for s in self.layout:
            arrays = []
            for _ in range(s.num_arrays):
                shape = (rows, s.num_kv_heads, s.head_size)
                arrays.append(np.memmap(self._file, s.dtype, "r+", offset, shape))
                offset += int(np.prod(shape)) * s.dtype.itemsize
            out.append(tuple(arrays))
        return out

    @property
    def page_bytes(self) -> int:
        return page_bytes(self.layout, self.block_size)

    @property
    def nbytes(self) -> int:
        """Host memory (or file) the tier takes when every chunk is written."""
        return self.num_pages * self.page_bytes

    def _row_ids(self, pages: np.ndarray) -> np.ndarray:
        pages = np.asarray(pages, np.int64)
        if len(pages) and (pages.min() < 0 or pages.max() >= self.num_pages):
            raise IndexError(f"host pages {pages.min()}..{pages.max()} outside the tier's "
                             f"{self.num_pages}")
        return (pages[:, None] * self.block_size + np.arange(self.block_size)).ravel()

    def store(self, pages, device_pages, to_pages) -> int:
        """Copy device pages `device_pages` (of engine `pages`) into host pages `to_pages`
        (waits for the device). -> bytes copied."""
        return self.store_async(pages, device_pages, to_pages).finish()

    def store_async(self, pages, device_pages, to_pages) -> PendingStore:
        """The copy of device pages `device_pages` into host pages `to_pages`, dispatched:
        the device gathers them and sends them to the host while the caller goes on;
        finish() writes them into the tier."""
        if len(device_pages) != len(to_pages):
            raise ValueError(f"{len(device_pages)} device pages into {len(to_pages)} host pages")
        rows = self._row_ids(to_pages)
        pending = pages.read_tokens_async(list(device_pages), 0, len(rows))
        return PendingStore(self, rows, pending, len(device_pages) * self.page_bytes)

    def load(self, pages, from_pages, device_pages) -> int:
        """Copy host pages `from_pages` into device pages `device_pages` (dispatched: the
        next step's forward reads them). -> bytes copied."""
        if len(device_pages) != len(from_pages):
            raise ValueError(f"{len(from_pages)} host pages into {len(device_pages)} device pages")
        rows = self._row_ids(from_pages)
        values = [tuple(host[rows] for host in set_rows) for set_rows in self.rows]
        pages.write_tokens(list(device_pages), 0, len(rows), values)
        return len(device_pages) * self.page_bytes

    def close(self) -> None:
        self.rows = []
        if self._file is not None:
            self._file.close()
            self._file = None


class PendingStore:
    """A store on its way from the device: ready() says whether finish() would wait."""

    def __init__(self, store: HostPageStore, rows: np.ndarray, pending, nbytes: int):
        self.store, self.rows, self.pending, self.nbytes = store, rows, pending, nbytes

    def ready(self) -> bool:
        return self.pending.ready()

    def finish(self) -> int:
        """Write the values into the tier's rows (waits for them). -> bytes copied."""
        values = self.pending.result()
        for set_rows, set_values in zip(self.store.rows, values):
            for host, value in zip(set_rows, set_values):
                host[self.rows] = value
        return self.nbytes
