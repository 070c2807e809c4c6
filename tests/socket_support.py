"""Raw-socket helpers for the transport tests: a connection with a read bound, everything until
the server closes, and one response's status and JSON body."""

from __future__ import annotations

import json
import socket


def connect(port: int, wait: float) -> socket.socket:
    """A loopback connection whose every read waits at most ``wait`` seconds."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=wait)
    sock.settimeout(wait)
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or resets it)."""
    chunks = []
    try:
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def answer(raw: bytes) -> tuple[int, dict]:
    """(status, JSON body) of one HTTP response with a Content-Length."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)
