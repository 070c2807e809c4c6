"""Listening sockets, bound before anything slow, and the connection budget the file limit allows.

``bind(host, port)`` runs first thing in ``python -m service``, before torch is imported and the
model loads, so a busy port is a one-line error at once (uvicorn binds only after its start-up, so
the error came after the model had begun loading). ``fit_to_file_limit`` lowers
``--max-connections`` to what the open-file limit (``RLIMIT_NOFILE``) can hold beside the files
already open and ``FD_RESERVE`` more for the server's own use.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket

log = logging.getLogger("service.transport")

FD_RESERVE = 64  # files kept for the server itself: checkpoint reads, /proc, logs, torch
BACKLOG = 2048  # connections the kernel holds for us while we are at the cap (uvicorn's default)


class ListenError(Exception):
    """The server cannot listen or accept as told (the message says why, in one line)."""


def fit_to_file_limit(requested: int) -> int:
    """``requested`` connections, or fewer if the open-file limit cannot hold them beside the
    files already open and ``FD_RESERVE`` more."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    room = soft - _open_files() - FD_RESERVE
    if room < 1:
        raise ListenError(
            f"the open-file limit ({soft}) leaves no room for client connections beside the "
            f"{FD_RESERVE} files the server keeps for itself: raise it (ulimit -n)"
        )
    if room < requested:  # common (a shell's soft limit is often 1024): say so, not a warning
        log.info(
            "accepting at most %d connections, not %d: the open-file limit is %d "
            "(raise it with ulimit -n for more)",
            room,
            requested,
            soft,
        )
    return min(requested, room)


def _open_files() -> int:
    try:
        return len(os.listdir("/dev/fd"))
    except OSError:
        return 0


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host:port`` (every address the host name resolves to)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ListenError(f"cannot listen on {where}: unknown host ({err.strerror})") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio does: IPv6 sockets stay IPv6-only
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as err:
        for sock in sockets:
            sock.close()
        raise ListenError(f"cannot listen on {where}: {_why(err)}") from None
    return sockets


def _why(err: OSError) -> str:
    if err.errno == errno.EADDRINUSE:
        return "the address is already in use (is another server running? pick another --port)"
    if err.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    if err.errno == errno.EADDRNOTAVAIL:
        return "the address is not on this machine (check --host)"
    return err.strerror or str(err)
