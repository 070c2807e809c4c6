"""Transport limits of a real ``python -m service`` process, attacked with raw sockets.

Each attack (a 128 MB header, 5,000 headers, 3,000 slowloris connections, 1,100 idle connections
under a 1,024 file limit, bad framing) is scaled down to what proves
the same thing on loopback. Before the transport guard each one got a 200, stayed open for ever,
or made real requests fail. Every wait is for something the server does (an answer, a close, a
metric), bounded by a socket timeout, never a sleep.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

import httpx
import pytest
from deploy_support import ServerProcess, make_tiny_checkpoint, metric_value
from socket_support import connect, read_to_eof

pytestmark = pytest.mark.timeout(120)
WAIT = 30.0  # the most any single read waits for the server (a bound, not an expectation)
HEADER_TIMEOUT, BODY_TIMEOUT, KEEP_ALIVE = "2", "2", "1"  # short, so the attacks end quickly


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transport")
    flags = ("--header-timeout", HEADER_TIMEOUT, "--body-timeout", BODY_TIMEOUT,
             "--keep-alive-timeout", KEEP_ALIVE)  # fmt: skip
    proc = ServerProcess(make_tiny_checkpoint(tmp / "ckpt"), tmp / "server.log", flags).start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()




def _answer(raw: bytes) -> tuple[int, dict]:
    """(status, JSON body) of one HTTP response with a Content-Length."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), head
    return status, json.loads(body)


def _send_then_read(port: int, request: bytes) -> tuple[int, dict]:
    """Send ``request`` from a thread (it may be refused before it is all sent) and read the
    answer and the close."""
    sock = connect(port, WAIT)

    def send() -> None:
        try:
            sock.sendall(request)
        except OSError:  # the server answered and closed first: that is the point
            pass

    sender = threading.Thread(target=send)
    sender.start()
    try:
        return _answer(read_to_eof(sock))
    finally:
        sender.join(WAIT)
        sock.close()


def _assert_still_serving(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/health", timeout=WAIT).status_code == 200
    resp = httpx.post(f"{server.url}/v1/completions", json={"prompt": "ab", "max_tokens": 4},
                      timeout=WAIT)  # fmt: skip
    assert resp.status_code == 200, resp.text


def test_an_oversized_header_gets_431_without_being_read_whole(server):
    """Issue: one 128 MB header was read whole (32 s, +64 MB RSS) and answered 200."""
    big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 * 1024 * 1024) + b"\r\n\r\n"
    status, body = _send_then_read(server.port, big)
    assert status == 431, body
    assert body["error"]["code"] == "header_too_large"
    assert "16384 bytes" in body["error"]["message"], body
    _assert_still_serving(server)


def test_five_thousand_headers_get_431(server):
    """Issue: 5,000 header fields got a 200."""
    fields = b"".join(b"X-Field-%d: v\r\n" % i for i in range(5000))
    status, body = _send_then_read(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + fields
                                   + b"\r\n")  # fmt: skip
    assert status == 431, body
    _assert_still_serving(server)


def test_more_header_fields_than_max_headers_get_431_even_when_small(server):
    fields = b"".join(b"a%d: b\r\n" % i for i in range(101))  # ~800 bytes, under the size limit
    status, body = _send_then_read(server.port, b"GET /health HTTP/1.1\r\n" + fields + b"\r\n")
    assert status == 431, body
    assert body["error"]["code"] == "too_many_headers"
    assert "more than 100 header fields" in body["error"]["message"]


def test_slowloris_connections_are_answered_408_and_closed(server):
    """Issue: 3,000 connections sending headers slowly were all still open after 60 s."""
    slow = [connect(server.port, WAIT) for _ in range(200)]
    silent = connect(server.port, WAIT)
    try:
        for sock in slow:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # ... and never the blank line
        for sock in slow:
            status, body = _answer(read_to_eof(sock))
            assert status == 408 and body["error"]["code"] == "request_timeout", body
            assert "headers did not arrive within 2s" in body["error"]["message"]
        assert read_to_eof(silent) == b"", "a silent connection is closed without an answer"
    finally:
        for sock in [*slow, silent]:
            sock.close()
    timeouts = metric_value(server.url, "gptserve_http_connections_closed_total",
                            reason="header_timeout")  # fmt: skip
    assert timeouts >= 201, "each connection closed on the header timeout is counted"
    _assert_still_serving(server)


def test_a_body_sent_too_slowly_is_answered_408(server):
    sock = connect(server.port, WAIT)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pro")
        status, body = _answer(read_to_eof(sock))  # fmt: skip
    finally:
        sock.close()
    assert status == 408, body
    assert body["error"]["code"] == "request_timeout"
    assert "body did not arrive within 2s" in body["error"]["message"]
    assert metric_value(server.url, "gptserve_http_connections_closed_total",
                        reason="body_timeout") >= 1  # fmt: skip
    _assert_still_serving(server)


def test_an_idle_keep_alive_connection_is_closed(server):
    sock = connect(server.port, WAIT)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = read_to_eof(sock)  # the answer, then the close once the connection sat idle
    finally:
        sock.close()
    assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b'{"status":"ok"}'), raw


@pytest.mark.parametrize(
    ("request_bytes", "problem"),
    [
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
         "Invalid character in Content-Length"),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
         b"Content-Length: 2\r\n\r\nab", "Duplicate Content-Length"),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
         b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", "Invalid character in chunk size"),
        (b"G@RBAGE / HTTP/1.1\r\n\r\n", "Invalid method"),
    ],
    ids=["content-length-not-a-number", "two-content-lengths", "bad-chunk-size", "bad-method"],
)  # fmt: skip
def test_malformed_framing_gets_the_json_error_envelope(server, request_bytes, problem):
    """Before: bad Content-Length or chunk framing got uvicorn's plain-text 400."""
    status, body = _send_then_read(server.port, request_bytes)
    assert status == 400
    assert body["error"]["code"] == "invalid_http"
    assert body["error"]["type"] == "invalid_request_error"
    assert problem in body["error"]["message"], body


@pytest.mark.timeout(180)
def test_idle_connections_past_the_file_limit_do_not_stop_real_requests(tmp_path):
    """Issue: under a 1,024 file limit, 1,100 idle connections made every real request fail.

    Here: a 128 file limit and 150 idle connections. A stream started before the flood keeps
    streaming (a connection with a request in flight is never closed to make room), and new
    requests are served: the longest-idle connections are closed to admit them.
    """
    server = ServerProcess(make_tiny_checkpoint(tmp_path / "ckpt"), tmp_path / "server.log",
                           nofile=128).start()  # fmt: skip
    idle: list[socket.socket] = []
    try:
        server.wait_ready()
        body = {"prompt": "ab", "max_tokens": 1_000_000, "stream": True}
        with httpx.Client(timeout=WAIT) as client, client.stream(
            "POST", f"{server.url}/v1/completions", json=body
        ) as stream:
            events = stream.iter_lines()
            assert next(e for e in events if e.startswith("data: "))
            idle = [connect(server.port, WAIT) for _ in range(150)]
            resp = httpx.post(f"{server.url}/v1/completions",
                              json={"prompt": "ab", "max_tokens": 4}, timeout=WAIT)  # fmt: skip
            assert resp.status_code == 200, resp.text
            assert next(e for e in events if e.startswith("data: ")), "the stream was cut"
        limit = metric_value(server.url, "gptserve_http_connections_limit")
        assert 0 < limit < 128 - 32, f"the connection cap {limit} does not fit the file limit"
        assert metric_value(server.url, "gptserve_http_connections") <= limit
        assert metric_value(server.url, "gptserve_http_connections_closed_total",
                            reason="evicted") > 0  # fmt: skip
        assert metric_value(server.url, "process_open_fds") < 128
        assert "Too many open files" not in server.log(), server.log()[-3000:]
        assert "accepting at most" in server.log(), "the lowered cap was not logged"
    finally:
        for sock in idle:
            sock.close()
        server.stop()


def test_hundreds_of_connections_waiting_at_once_are_all_served(server):
    """The accept loop takes every connection waiting in the backlog on one wake-up (in batches
    of ``ACCEPT_BATCH``, 128), not one per event-loop iteration. With the server stopped, 300
    clients connect and send a request; once it runs again, every one gets its answer: none is
    dropped at a batch's edge (a connection accepted and then never served was closed unread,
    which its client saw as a reset)."""
    n = 300
    os.kill(server.proc.pid, signal.SIGSTOP)
    socks = []
    try:
        for _ in range(n):  # the kernel completes each handshake; they wait in the backlog
            sock = connect(server.port, WAIT)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            socks.append(sock)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    try:
        statuses = [_status(read_to_eof(sock)) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert statuses == [200] * n, f"{sum(s != 200 for s in statuses)} of {n} not answered 200"
    _assert_still_serving(server)


def _status(raw: bytes) -> int:
    """An HTTP response's status; 0 for none (the connection was closed or reset unanswered)."""
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0
