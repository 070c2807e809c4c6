"""SIGTERM drains a real ``python -m service`` process: 503 for new work, in-flight work ends,
exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest
from conftest import wait_until

pytestmark = pytest.mark.timeout(120)
KEY = "s3cret-key-never-logged"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(url: str, max_tokens: int, first_chunk: threading.Event, out: dict) -> None:
    body = {"prompt": "abc", "max_tokens": max_tokens, "stream": True}
    finish, events = None, []
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=60) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line)
            first_chunk.set()
            if line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    finish = choice["finish_reason"] or finish
    out.update(finish=finish, done=events[-1] == "data: [DONE]" if events else False)


def test_sigterm_refuses_new_work_lets_in_flight_requests_finish_and_exits_zero(
    tiny_checkpoint, tmp_path
):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTSERVE_API_KEY": KEY}
    log_file = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--checkpoint",
            str(tiny_checkpoint),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--shutdown-timeout",
            "3",
            "--log-level",
            "debug",
        ],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    logs = lambda: (tmp_path / "server.log").read_text()  # noqa: E731
    try:

        def ready() -> bool:
            try:
                return httpx.get(url + "/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, logs()
                return False

        wait_until(ready, timeout=60, what="the server to become ready")
        short, long_ = {}, {}
        started = [threading.Event(), threading.Event()]
        threads = [
            threading.Thread(target=_stream, args=(url, 60, started[0], short)),
            threading.Thread(target=_stream, args=(url, 10**6, started[1], long_)),
        ]
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in started), "streams did not start"

        proc.send_signal(signal.SIGTERM)
        wait_until(
            lambda: httpx.get(url + "/ready", timeout=5).status_code == 503,
            what="/ready to turn 503",
        )
        refused = httpx.post(url + "/v1/completions", json={"prompt": "a"}, headers=AUTH)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"

        for t in threads:
            t.join(60)
        assert short == {"finish": "length", "done": True}, "in-flight request did not finish"
        assert long_ == {"finish": "abort", "done": True}, "overlong request was not cut"
        assert proc.wait(30) == 0, logs()
        assert "draining" in logs(), logs()
        assert KEY not in logs(), "the API key appeared in the server's logs"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()
