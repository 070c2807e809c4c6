"""Attacks on the HTTP edge and on request validation, against real servers.

Each test reproduces one defect the attack found on 1446e4f (``python -m service`` processes,
raw sockets where the framing matters, many connections where the attack used many) and holds
the fix. Every wait is bounded by a socket or client timeout (a bound, not an expectation).
"""

from __future__ import annotations

import itertools
import re
import socket
import threading
import time

import httpx
import pytest
from conftest import wait_until
from deploy_support import ServerProcess, make_tiny_checkpoint, metric_value
from socket_support import answer, connect, read_to_eof

from service.transport.limits import TransportLimits

pytestmark = pytest.mark.timeout(240)
WAIT = 60.0  # the most one read waits for the server (a bound, not an expectation)
KEY = "edge-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("edge") / "ckpt")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("edge-log") / "server.log"
    flags = ("--keep-alive-timeout", "1", "--header-timeout", "5")
    proc = ServerProcess(checkpoint, log, flags).start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def keyed(checkpoint, tmp_path_factory):
    """A server with ``--api-key``: its 401s are what an outsider can reach."""
    log = tmp_path_factory.mktemp("keyed-log") / "server.log"
    proc = ServerProcess(checkpoint, log, ("--api-key", KEY)).start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()





def _post(url: str, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=WAIT, **kwargs)


# -- defect 2: pipelined requests ---------------------------------------------------------------


def test_pipelined_requests_queue_a_bounded_number_per_connection(server):
    """Issue: ~256 KiB of pipelined ``GET /health`` per connection, never read, grew RSS by
    ~18 MB a connection and made another client's /health take 28 s. Now one connection has at
    most ``max_pipelined`` requests queued: past them the rest is not parsed, the queued ones
    are answered, and the connection is closed (a pipelining client retries the others)."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    flood = request * (256 * 1024 // len(request))
    socks = [connect(server.port, WAIT) for _ in range(40)]
    try:
        for sock in socks:
            sock.sendall(flood)
        # the 40 unread floods do not keep anyone else out
        assert httpx.get(f"{server.url}/health", timeout=WAIT).status_code == 200
        answered = read_to_eof(socks[0]).count(b"HTTP/1.1 200 OK")
    finally:
        for sock in socks:
            sock.close()
    limit = TransportLimits().max_pipelined
    assert 1 <= answered <= limit + 1, f"{answered} of {len(flood) // len(request)} pipelined " \
        f"requests were answered on one connection (the running one and {limit} queued may be)"
    assert metric_value(server.url, "gptserve_http_connections_closed_total",
                        reason="pipeline_full") >= 40  # fmt: skip


def test_a_few_pipelined_requests_are_all_answered_in_order(server):
    """The bound does not break pipelining within it: each request gets its answer, in order."""
    sock = connect(server.port, WAIT)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # fmt: skip
        raw = read_to_eof(sock)
    finally:
        sock.close()
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]
    assert statuses == [200, 404, 200], raw[:2000]


# -- defect 7: slow bodies at the connection cap -----------------------------------------------


def test_slow_bodies_at_the_connection_cap_do_not_lock_out_new_clients(checkpoint, tmp_path):
    """Issue: 1,024 connections that sent headers with ``Content-Length: 100000`` and then one
    byte locked every new client out (``/health`` included) until the body timeout. Here: a cap
    of 200 and 200 such connections, with a body timeout far past the client's patience; /health
    and a completion still get in, and the oldest slow uploads are refused with 408."""
    cap = 200
    flags = ("--max-connections", str(cap), "--body-timeout", "600")
    server = ServerProcess(checkpoint, tmp_path / "server.log", flags).start()
    slow: list[socket.socket] = []
    try:
        server.wait_ready()
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n{")  # fmt: skip
        for _ in range(cap):
            sock = connect(server.port, WAIT)
            sock.sendall(head)
            slow.append(sock)
        with httpx.Client(timeout=WAIT) as client:
            assert client.get(f"{server.url}/health").status_code == 200
            resp = client.post(f"{server.url}/v1/completions", json={"prompt": "ab", "max_tokens": 2})
            assert resp.status_code == 200, resp.text
        status, body = answer(read_to_eof(slow[0]))  # the oldest upload made room
        assert status == 408 and body["error"]["code"] == "request_timeout", body
        assert metric_value(server.url, "gptserve_http_connections_closed_total",
                            reason="evicted") >= 1  # fmt: skip
    finally:
        for sock in slow:
            sock.close()
        server.stop()


# -- defect 8: Content-Length with optional whitespace -----------------------------------------


@pytest.mark.parametrize("value", [b"15 ", b"15\t", b" 15"])
def test_content_length_with_optional_whitespace_is_parsed(server, value):
    """Issue: ``Content-Length: 15 `` (legal: RFC 9110 trims optional whitespace) got 413."""
    body = b'{"prompt":"ab"}'
    assert len(body) == 15
    sock = connect(server.port, WAIT)
    try:
        sock.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: " + value + b"\r\n\r\n" + body)
        status, reply = answer(read_to_eof(sock))
    finally:
        sock.close()
    assert status == 200, reply
    assert reply["count"] == 2


# -- defect 10 and 11, rough edge 9: precise 400s ----------------------------------------------


@pytest.mark.parametrize("key", [" 5 ", "1_0", "\u0665", "+5", "5\n", "0x5", "-1"])
def test_logit_bias_keys_must_be_canonical_decimal_token_ids(server, key):
    """Issue: ``int()`` accepted ``" 5 "``, ``"1_0"`` and ``"٥"`` as token ids."""
    resp = _post(server.url, "/v1/completions",
                 {"prompt": "ab", "max_tokens": 1, "logit_bias": {key: 1}})  # fmt: skip
    assert resp.status_code == 400, f"logit_bias key {key!r} was accepted"
    assert resp.json()["error"]["param"] == "logit_bias"
    ok = _post(server.url, "/v1/completions",
               {"prompt": "ab", "max_tokens": 1, "logit_bias": {"5": 1}})  # fmt: skip
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("field", ["max_completion_tokens", "max_tokens"])
def test_a_chat_length_error_names_the_field_the_client_sent(server, field):
    """Issue: ``max_completion_tokens: 2000000`` got an error naming ``max_tokens``."""
    body = {"messages": [{"role": "user", "content": "hi"}], field: 2_000_000}
    error = _post(server.url, "/v1/chat/completions", body).json()["error"]
    assert error["param"] == field, error
    assert error["message"].startswith(f"{field} must be"), error


def test_a_nan_temperature_says_it_must_be_finite(server):
    """Issue: NaN got pydantic's union message ("valid integer; or finite number")."""
    resp = httpx.post(f"{server.url}/v1/completions", timeout=WAIT,
                      content=b'{"prompt": "a", "temperature": NaN}',
                      headers={"Content-Type": "application/json"})  # fmt: skip
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["param"], error["message"]) == ("temperature", "temperature must be a finite "
                                                  "number"), error  # fmt: skip


# -- defect 4: log injection -------------------------------------------------------------------


def test_control_characters_from_a_request_are_escaped_in_the_text_log(keyed):
    """Issue: a path with ``%0a`` / ``%1b`` wrote a forged access line and raw ANSI escapes into
    the text log (a 401 was enough)."""
    forged = "%0a2026-01-01%2000:00:00,000%20INFO%20service.access:%20forged%1b[31m"
    sock = connect(keyed.port, WAIT)
    try:
        sock.sendall(f"GET /v1/models{forged} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     "\r\n".encode())  # fmt: skip
        status, _ = answer(read_to_eof(sock))
    finally:
        sock.close()
    assert status == 401
    httpx.get(f"{keyed.url}/health", timeout=WAIT)  # a later line: the 401's line is written
    log = keyed.log()
    assert "\x1b" not in log, "a raw escape character reached the log"
    lines = log.splitlines()
    assert not [line for line in lines if line.startswith("2026-01-01")], "a forged line"
    assert any("/v1/models\\n2026-01-01" in line for line in lines), log[-2000:]


# -- defect 5 and 6: big requests off the event loop -------------------------------------------


def test_the_sequence_limit_is_checked_before_any_prompt_is_encoded(server):
    """Issue: ``{"prompt": ["a"] * 200000}`` was refused only after every prompt was encoded
    (2.9 s of blocked event loop). The last prompt here is empty: encoding would reach it and
    say so; counting first refuses the request for its size without encoding any."""
    resp = _post(server.url, "/v1/completions", {"prompt": ["a"] * 200_000 + [""]})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "n" and "200001 sequences" in error["message"], error


def test_an_echo_with_logprobs_of_a_huge_prompt_does_not_block_the_event_loop(server):
    """Issue: ``echo`` + ``logprobs`` on a ~600 KB prompt blocked the event loop for 4-5 s while
    the prompt's logprob entries and the response were built. /health is polled without pause
    while such a request runs: no gap between two /health answers may span half of it (before
    the fix one gap spanned almost all of it: the loop answered nothing else)."""
    body = {"prompt": "ab" * 150_000, "max_tokens": 1, "echo": True, "logprobs": 1}
    answers: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=WAIT) as client:
            while not done.is_set():
                client.get(f"{server.url}/health").raise_for_status()
                answers.append(time.monotonic())

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        wait_until(lambda: len(answers) >= 3, WAIT, "the /health poller to run")
        started = time.monotonic()
        resp = _post(server.url, "/v1/completions", body)
        ended = time.monotonic()
    finally:
        done.set()
        poller.join(WAIT)
    assert resp.status_code == 200, resp.text[:500]
    assert len(resp.json()["choices"][0]["logprobs"]["tokens"]) == 300_001
    during = [started, *(t for t in answers if started < t < ended), ended]
    longest = max(b - a for a, b in itertools.pairwise(during))
    assert longest < (ended - started) / 2, (
        f"/health went unanswered for {longest:.2f}s of the echo request's {ended - started:.2f}s"
    )
