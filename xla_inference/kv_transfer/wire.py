"""The network connector's wire format (kv_transfer/network.py): a decode engine asks a
prefill engine for tokens [start, end) of a finished request's KV over one TCP connection.
Plain numpy and sockets: no vllm, no torch, no JAX.

    ask:    one line of JSON, {"request_id", "start", "end"}; start == end releases the
            request's pages without reading them
    answer: an 8-byte big-endian header length, the header (JSON: {"ok": true,
            "num_tokens", "sets": [[[heads, head size], dtype], ...] per set}, or {"ok":
            false, "error"}), then per set of cache arrays each array's raw bytes
            ([num_tokens, heads, head size], C order)."""

from __future__ import annotations

import json
import socket
import struct

import numpy as np

_LENGTH = struct.Struct(">Q")
MAX_ASK_BYTES = 1 << 16


class TransferError(RuntimeError):
    """A fetch the producer refused, or a connection that failed."""


def layout_header(layout) -> list:
    """runner/kv_pages.ArraySetLayout list -> the header's "sets" (JSON types)."""
    return [[[[s.num_kv_heads, s.head_size], str(np.dtype(s.dtype))]] * s.num_arrays
            for s in layout]


def send_ask(sock: socket.socket, request_id: str, start: int, end: int) -> None:
    sock.sendall(json.dumps(dict(request_id=request_id, start=start, end=end)).encode() + b"\n")


def read_ask(sock: socket.socket) -> dict:
    """The ask a client sent (raises TransferError on a malformed one)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise TransferError("connection closed before the ask was complete")
        data += chunk
        if len(data) > MAX_ASK_BYTES:
            raise TransferError("ask too long")
    try:
        ask = json.loads(data)
        return dict(request_id=str(ask["request_id"]), start=int(ask["start"]),
                    end=int(ask["end"]))
    except (ValueError, KeyError, TypeError) as error:
        raise TransferError(f"malformed ask: {error}") from error


def _send_header(sock: socket.socket, header: dict) -> None:
    data = json.dumps(header).encode()
    sock.sendall(_LENGTH.pack(len(data)) + data)


def send_error(sock: socket.socket, message: str) -> None:
    _send_header(sock, dict(ok=False, error=message))


def send_values(sock: socket.socket, layout, values) -> int:
    """Send `values` (per set, a tuple of [n, heads, head size] arrays); -> bytes sent."""
    num_tokens = len(values[0][0]) if values and values[0] else 0
    _send_header(sock, dict(ok=True, num_tokens=num_tokens, sets=layout_header(layout)))
    sent = 0
    for set_values in values:
        for array in set_values:
            data = memoryview(np.ascontiguousarray(array)).cast("B")
            sock.sendall(data)
            sent += len(data)
    return sent


def _recv_exactly(sock: socket.socket, n: int) -> bytearray:
    buffer = bytearray(n)
    view, got = memoryview(buffer), 0
    while got < n:
        read = sock.recv_into(view[got:], n - got)
        if not read:
            raise TransferError(f"connection closed after {got} of {n} bytes")
        got += read
    return buffer


def recv_values(sock: socket.socket, layout, num_tokens: int) -> list[tuple[np.ndarray, ...]]:
    """The answer to an ask for `num_tokens` tokens, checked against this engine's cache
    layout; raises TransferError with the producer's message or what differs."""
    (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
    if length > MAX_ASK_BYTES:
        raise TransferError(f"answer header of {length} bytes")
    header = json.loads(bytes(_recv_exactly(sock, length)))
    if not header.get("ok"):
        raise TransferError(f"the prefill engine refused: {header.get('error')}")
    if header["num_tokens"] != num_tokens:
        raise TransferError(f"the prefill engine sent {header['num_tokens']} tokens; "
                            f"{num_tokens} asked")
    want = layout_header(layout)
    if header["sets"] != want:
        raise TransferError(f"the prefill engine's cache has layout {header['sets']}; this "
                            f"engine's is {want} (same model and KV cache dtype needed)")
    out = []
    for s in layout:
        dtype = np.dtype(s.dtype)
        shape = (num_tokens, s.num_kv_heads, s.head_size)
        size = num_tokens * s.num_kv_heads * s.head_size * dtype.itemsize
        out.append(tuple(np.frombuffer(_recv_exactly(sock, size), dtype).reshape(shape)
                         for _ in range(s.num_arrays)))
    return out
