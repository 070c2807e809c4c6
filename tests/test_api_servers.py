"""Several HTTP front ends on one engine core (``--api-servers N``), through real
``python -m service`` processes: both front ends accept on the shared socket; admission is exact
across them (capacity 2: never a third live sequence, whichever process a request reaches); the
metrics are the sum of both, whichever process a scrape reaches; SIGTERM lets the streams in
flight finish and every process exits; a front end or the core killed under load stops the server with
exit 4 and leaves no process behind; live reload is refused with several front ends."""

from __future__ import annotations

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
    make_tiny_checkpoint,
    metric_value,
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


def _core_pid(server: ServerProcess) -> int:
    found = re.search(r"engine core \(pid (\d+)\)", server.log())
    assert found, server.log()
    return int(found.group(1))


def _answered_by(server: ServerProcess, status: int) -> set[int]:
    """The pids of the processes whose access log has a completion answered with ``status``."""
    return {r["pid"] for r in _records(server)
            if r["logger"] == "service.access" and r.get("status") == status
            and r.get("path") == "/v1/completions"}


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _wait_gone(pids, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.1)
    assert all(_gone(p) for p in pids), f"still running: {[p for p in pids if not _gone(p)]}"


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


def test_two_front_ends_share_one_socket_one_core_and_one_capacity(tmp_path):
    server = _start(tmp_path, "--max-batch-size", "1", "--max-queue", "1", "--api-key", KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        second = _front_end_pid(server)
        first, core = server.proc.pid, _core_pid(server)
        assert len({first, second, core}) == 3

        # both front ends take connections from the one listening socket
        done = 0
        for _ in range(200):
            reply = httpx.post(f"{server.url}/v1/completions", headers=auth, timeout=60,
                               json={"prompt": "ab", "max_tokens": 2})
            assert reply.status_code == 200, reply.text
            done += 1
            if done >= 8 and _answered_by(server, 200) >= {first, second}:
                break
        assert _answered_by(server, 200) == {first, second}, "one front end took no request"

        # capacity 2 (one slot + a queue of one) holds across both processes
        holders = Streams(server.url, 2, headers=auth, temperature=1.0, max_tokens=3000)
        holders.wait_started()
        refused = 0
        for _ in range(60):
            reply = httpx.post(f"{server.url}/v1/completions", headers=auth, timeout=60,
                               json={"prompt": "ab", "max_tokens": 2})
            assert reply.status_code == 503, f"a third sequence got in: {reply.text}"
            assert reply.json()["error"]["code"] == "queue_full", reply.text
            refused += 1
            if refused >= 4 and _answered_by(server, 503) >= {first, second}:
                break
        assert _answered_by(server, 503) == {first, second}, "one front end refused nothing"

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

        # live reload switches one front end's engine: refused here, with a reason
        reload = httpx.post(f"{server.url}/admin/reload", headers=auth, json={}, timeout=30)
        assert reload.status_code == 409, reload.text
        assert reload.json()["error"]["code"] == "reload_unsupported"

        # SIGTERM drains every front end: both holders (one running, one queued, wherever they
        # arrived) finish whole before the core stops, and every process exits
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(90) == 0, server.log()
        holders.join()
        assert [(r.complete, r.finish_reason) for r in holders.results] == [
            (True, "length"), (True, "length")], holders.results
        _wait_gone([first, second, core])
    finally:
        server.stop()


@pytest.mark.parametrize("victim", ["core", "front end"])
def test_a_killed_core_or_front_end_stops_every_process_with_exit_4(tmp_path, victim):
    server = _start(tmp_path, "--max-batch-size", "8")
    try:
        second = _front_end_pid(server)
        first, core = server.proc.pid, _core_pid(server)
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


def test_several_front_ends_need_the_process_core_and_no_watch(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--api-servers", "2", "--watch"], environ={})
    assert "--watch needs --api-servers 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--api-servers", "2", "--engine-core", "thread"], environ={})
    assert "needs --engine-core process" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--api-servers", "0"], environ={})
    assert parse_settings(["--api-servers", "3"], environ={}).api_servers == 3
