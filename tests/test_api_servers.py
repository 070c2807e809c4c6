"""Several HTTP front ends on one engine core (``--api-servers N``), through real
``python -m service`` processes: both front ends accept on the shared socket; admission is exact
across them (capacity 2: never a third live sequence, whichever process a request reaches); the
metrics are the sum of both, whichever process a scrape reaches; SIGTERM lets the streams in
flight finish and every process exits; a front end or the core killed under load stops the server with
exit 4 and leaves no process behind; a live reload asked of either front end switches both to a
new core while a stream in flight finishes on the old one."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from deploy_support import (
    ServerProcess,
    StreamResult,
    core_pid,
    make_tiny_checkpoint,
    metric_value,
    process_gone,
    stream_completion,
)

from service.settings import parse_settings

pytestmark = pytest.mark.timeout(240)
KEY = "api-servers-key"


def _records(server: ServerProcess) -> list[dict]:
    out = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
    return out


def _front_end_pid(server: ServerProcess, timeout: float = 90.0) -> int:
    """The second front end's pid, once it listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()}")
        records = _records(server)
        joined = [int(m.group(1)) for r in records
                  if (m := re.match(r"API server 1 \(pid (\d+)\) serving", r["message"]))]
        if joined and any(r["pid"] == joined[0] and r["message"].startswith("listening on")
                          for r in records):
            return joined[0]
        time.sleep(0.2)
    raise TimeoutError(f"the second API server never listened:\n{server.log()}")


def _answered_by(server: ServerProcess, status: int) -> set[int]:
    """The pids of the processes whose access log has a completion answered with ``status``."""
    return {r["pid"] for r in _records(server)
            if r["logger"] == "service.access" and r.get("status") == status
            and r.get("path") == "/v1/completions"}


def _connection_to(server: ServerProcess, pid: int, tries: int = 64) -> http.client.HTTPConnection:
    """A keep-alive connection that front end ``pid`` accepted (found through /proc: the server
    side of the connection is a socket among that process's descriptors)."""
    opened = []
    try:
        for _ in range(tries):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            conn.request("GET", "/health")
            conn.getresponse().read()
            opened.append(conn)
            if _owner(server.port, conn.sock.getsockname()[1]) == pid:
                opened.remove(conn)
                return conn
    finally:
        for other in opened:
            other.close()
    raise AssertionError(f"front end {pid} accepted none of {tries} connections")


def _owner(server_port: int, client_port: int) -> int | None:
    """The pid holding the server side of the loopback connection from ``client_port``."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if (int(local.split(":")[1], 16) == server_port
                and int(remote.split(":")[1], 16) == client_port):
            inode = fields[9]
    if inode is None:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return int(entry.name)
            except OSError:
                continue
    return None


def _wait_gone(pids, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(process_gone(p) for p in pids):
        time.sleep(0.1)
    assert all(process_gone(p) for p in pids), f"still running: {[p for p in pids if not process_gone(p)]}"


def _start(tmp_path: Path, *args: str) -> ServerProcess:
    server = ServerProcess(make_tiny_checkpoint(tmp_path / "ck"), tmp_path / "server.log",
                           args=("--api-servers", "2", "--log-format", "json", *args))
    server.start()
    server.wait_ready(90)
    return server


class Streams:
    """Endless streaming completions on their own connections, read on threads."""

    def __init__(self, url: str, count: int, **params) -> None:
        self.results: list[StreamResult] = []
        self.statuses: list[int] = []
        self._headers = threading.Semaphore(0)
        self._threads = [threading.Thread(target=self._run, args=(url, params), daemon=True)
                         for _ in range(count)]
        for thread in self._threads:
            thread.start()

    def _run(self, url: str, params: dict) -> None:
        def on_headers(_headers) -> None:
            self._headers.release()

        params = dict(params)  # each thread its own copy
        max_tokens = params.pop("max_tokens", 10**6)
        with httpx.Client(timeout=120) as client:
            self.results.append(stream_completion(client, url, "ab", max_tokens,
                                                  on_headers=on_headers, **params))

    def wait_started(self) -> None:
        for _ in self._threads:
            assert self._headers.acquire(timeout=60), "a stream never got its headers"

    def join(self) -> None:
        for thread in self._threads:
            thread.join(90)


def test_two_front_ends_share_one_socket_one_core_one_capacity_and_reloads(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", seed=0, provenance={"iterations": 100})
    b = make_tiny_checkpoint(tmp_path / "b", seed=1, provenance={"iterations": 200})
    server = ServerProcess(a, tmp_path / "server.log", args=(
        "--api-servers", "2", "--log-format", "json", "--api-key", KEY,
        "--max-batch-size", "1", "--max-queue", "1"))
    server.start()
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        server.wait_ready(90)
        second = _front_end_pid(server)
        first, core = server.proc.pid, core_pid(server)
        assert len({first, second, core}) == 3

        # both front ends take connections from the one listening socket
        def complete(pid: int) -> tuple[int, dict]:
            conn = _connection_to(server, pid)
            conn.request("POST", "/v1/completions", json.dumps({"prompt": "ab", "max_tokens": 2}),
                         {**auth, "Content-Type": "application/json"})
            reply = conn.getresponse()
            body = json.loads(reply.read())
            conn.close()
            return reply.status, body

        done = 0
        for pid in (first, second, first, second):
            status, body = complete(pid)
            assert status == 200, body
            done += 1
        assert _answered_by(server, 200) == {first, second}

        # capacity 2 (one slot + a queue of one) holds across both processes
        holders = Streams(server.url, 2, headers=auth, temperature=1.0, max_tokens=3000)
        holders.wait_started()
        refused = 0
        for pid in (first, second, first, second):
            status, body = complete(pid)
            assert status == 503, f"a third sequence got in: {body}"
            assert body["error"]["code"] == "queue_full", body
            refused += 1
        assert _answered_by(server, 503) == {first, second}

        # whichever process a scrape reaches, the counters are both processes' sums
        finished = done
        for _ in range(6):
            assert metric_value(server.url, "gptserve_request_success_total",
                                finish_reason="length") == finished
            assert metric_value(server.url, "gptserve_request_rejected_total",
                                reason="queue_full") == refused
            assert metric_value(server.url, "gptserve_num_requests_running") == 1
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        check = subprocess.run(["promtool", "check", "metrics"], input=text, text=True, check=False,
                               capture_output=True)
        assert check.returncode == 0 and "error" not in check.stdout.lower(), check

        # a live reload asked of either front end (on a connection it accepted) switches both to
        # a new core before it answers; the holders finish on the old core, on the old weights
        for target, pid in ((b, second), (a, first)):
            conn = _connection_to(server, pid)
            conn.request("POST", "/admin/reload", json.dumps({"checkpoint": str(target)}),
                         {**auth, "Content-Type": "application/json"})
            reply = conn.getresponse()
            body = json.loads(reply.read())
            conn.close()
            assert reply.status == 200 and body["status"] == "reloaded", body
            want = "it200-" if target == b else "it100-"
            for front in (first, second):
                status, body = complete(front)
                assert status == 200 and body["system_fingerprint"].startswith(want), (front, body)
        holders.join()
        for result in holders.results:
            assert result.complete and result.finish_reason == "length", result
            assert result.fingerprint.startswith("it100-"), "a stream moved to another model"
        cores = {int(m.group(1)) for m in re.finditer(r"engine core \(pid (\d+)\)",
                                                       server.log())}
        assert len(cores) == 3, "each reload starts a core"

        # SIGTERM drains every front end: streams in flight (one running, one queued, wherever
        # they arrived) finish whole before the core stops, and every process exits
        drained = Streams(server.url, 2, headers=auth, max_tokens=300)
        drained.wait_started()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(90) == 0, server.log()
        drained.join()
        assert [(r.complete, r.finish_reason) for r in drained.results] == [
            (True, "length"), (True, "length")], drained.results
        _wait_gone([first, second, *cores])
    finally:
        server.stop()


def test_the_engine_cores_counts_are_the_same_whichever_front_end_a_scrape_reaches(tmp_path):
    """The core's counts live in one file per core in the folder both front ends share: each
    series is counted once (not once per front end), equal in both, exact (n requests of m
    tokens: n*(m-1) inter-token gaps, as the old per-token path counted), and a reload keeps
    the retired core's counts in the sums."""
    a = make_tiny_checkpoint(tmp_path / "a", seed=0, provenance={"iterations": 100})
    b = make_tiny_checkpoint(tmp_path / "b", seed=1, provenance={"iterations": 200})
    server = ServerProcess(a, tmp_path / "server.log", args=(
        "--api-servers", "2", "--log-format", "json", "--api-key", KEY))
    server.start()
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    tokens = 5
    try:
        server.wait_ready(90)
        second = _front_end_pid(server)
        first = server.proc.pid

        def ask(pid: int, method: str, path: str, body: dict | None = None) -> str:
            conn = _connection_to(server, pid)
            conn.request(method, path, None if body is None else json.dumps(body), auth)
            reply = conn.getresponse()
            text = reply.read().decode()
            conn.close()
            assert reply.status == 200, text
            return text

        def counts(pid: int) -> dict[str, float]:
            samples = {}
            for line in ask(pid, "GET", "/metrics").splitlines():
                if line.startswith("gptserve_") and not line.startswith("gptserve_http"):
                    key, _, value = line.rpartition(" ")
                    samples[key] = float(value)
            return samples

        def check(requests: int) -> dict[str, float]:
            seen = counts(first)
            assert counts(second) == seen, "the front ends disagree"
            assert seen["gptserve_inter_token_latency_seconds_count"] == requests * (tokens - 1)
            for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                         "request_queue_time_seconds", "request_generation_tokens"):
                assert seen[f"gptserve_{name}_count"] == requests, name
            assert seen["gptserve_generation_tokens_total"] == requests * tokens
            assert seen["gptserve_batch_size_sum"] == requests * tokens
            return seen

        def complete(pid: int) -> None:
            ask(pid, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": tokens})

        for pid in (first, second, second):
            complete(pid)
        before = check(3)
        ask(second, "POST", "/admin/reload", {"checkpoint": str(b)})
        for pid in (first, second):
            complete(pid)
        after = check(5)
        assert after["gptserve_engine_step_seconds_count"] > before[
            "gptserve_engine_step_seconds_count"]
        text = ask(first, "GET", "/metrics")
        check = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                               check=False, capture_output=True)
        assert check.returncode == 0 and "error" not in check.stdout.lower(), check
    finally:
        server.stop()


@pytest.mark.parametrize("victim", ["core", "front end"])
def test_a_killed_core_or_front_end_stops_every_process_with_exit_4(tmp_path, victim):
    server = _start(tmp_path, "--max-batch-size", "8")
    try:
        second = _front_end_pid(server)
        first, core = server.proc.pid, core_pid(server)
        streams = Streams(server.url, 6, temperature=1.0)
        streams.wait_started()
        time.sleep(0.5)
        os.kill(core if victim == "core" else second, signal.SIGKILL)
        assert server.proc.wait(60) == 4, server.log()
        streams.join()
        assert len(streams.results) == 6
        for result in streams.results:  # an error event, or the connection cut with its process
            assert result.finish_reason == "error" or result.error is not None, result
        assert ("exited (killed by signal 9)" in server.log()), server.log()
        _wait_gone([first, second, core])
    finally:
        server.stop()


def test_several_front_ends_need_the_process_core(capsys):
    assert parse_settings(["--api-servers", "2", "--watch"], environ={}).watch
    with pytest.raises(SystemExit):
        parse_settings(["--api-servers", "2", "--engine-core", "thread"], environ={})
    assert "needs --engine-core process" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--api-servers", "0"], environ={})
    assert parse_settings(["--api-servers", "3"], environ={}).api_servers == 3
