"""The server's command-line edge, run as a real process: start-up errors, logs, process metrics.

A busy port and an unavailable ``--device`` each fail in one line on stderr with their own exit
status, before the model loads (the checkpoint given is unreadable: had the server tried to load
it, the error would be about the checkpoint) and before anything listens. Logs have one format,
ours and uvicorn's alike, as text or JSON lines, with one access line per request.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import httpx
import pytest
from deploy_support import ROOT, ServerProcess, child_env, make_tiny_checkpoint

pytestmark = pytest.mark.timeout(120)
TEXT_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: "
)


def _unreadable_checkpoint(tmp_path):
    bad = tmp_path / "unreadable"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    return bad


def _run(args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(  # noqa: PLW1510 - the exit status is the assertion
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_a_busy_port_fails_in_one_line_with_exit_3_before_loading(tmp_path):
    """Before: a busy port gave uvicorn's raw `[Errno 98]` after 14 s of loading."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _run(["--checkpoint", str(_unreadable_checkpoint(tmp_path)), "--port", str(port)])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 3, proc.stderr
    assert lines == [
        f"gptserve: cannot listen on 127.0.0.1:{port}: the address is already in use "
        "(is another server running? pick another --port)"
    ], proc.stderr


def test_device_cuda_without_a_gpu_fails_in_one_line_with_exit_2_before_listening(tmp_path):
    """Before: `--device cuda` without a GPU failed only once the server was listening."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = _run(
        ["--checkpoint", str(_unreadable_checkpoint(tmp_path)), "--port", str(port),
         "--device", "cuda"],
        CUDA_VISIBLE_DEVICES="",  # no GPU for torch, also on a machine that has one
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("gptserve: --device cuda: "), proc.stderr
    assert "use --device cpu" in lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "ckpt")


def _serve_and_stop(checkpoint, log_path, *flags: str) -> tuple[str, dict[str, str]]:
    """Start a server, send a completion (with a request id) and a bad request, stop it (SIGTERM);
    return its whole log and the completion's response headers."""
    server = ServerProcess(checkpoint, log_path, flags).start()
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            ok = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3},
                             headers={"X-Request-Id": "trace-42"})  # fmt: skip
            assert ok.status_code == 200, ok.text
            assert client.post("/v1/completions", json={"prompt": "ab", "n": 0}).status_code == 400
            metrics = client.get("/metrics").text
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.log()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_max_fds"):  # fmt: skip
        assert re.search(rf"^{name} \d", metrics, re.M), f"/metrics has no {name}"
    return server.log(), dict(ok.headers)


def test_text_logs_have_one_format_and_one_access_line_per_request(checkpoint, tmp_path):
    """Before: uvicorn's `INFO:     ...` lines were mixed with ours; no per-request line."""
    log, headers = _serve_and_stop(checkpoint, tmp_path / "server.log")
    lines = log.strip().splitlines()
    assert lines and all(TEXT_LINE.match(line) for line in lines), "\n".join(
        line for line in lines if not TEXT_LINE.match(line)
    )
    assert any(" uvicorn.error: Started server process" in line for line in lines)
    assert headers["x-request-id"] == "trace-42"
    access = [line for line in lines if " service.access: " in line]
    assert len(access) == 2, access  # the completion and the 400; probes are debug-level
    assert re.search(r"POST /v1/completions 200 request_id=trace-42 client=127\.0\.0\.1 .*"
                     r"duration_s=\d", access[0]), access[0]  # fmt: skip
    assert " POST /v1/completions 400 " in access[1]


def test_json_logs_are_one_object_per_line_for_every_logger(checkpoint, tmp_path):
    log, _ = _serve_and_stop(checkpoint, tmp_path / "server.log", "--log-format", "json")
    records = [json.loads(line) for line in log.strip().splitlines()]  # each line is JSON
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert {"uvicorn.error", "service", "service.access"} <= {r["logger"] for r in records}
    (done,) = [r for r in records if r.get("request_id") == "trace-42"]
    assert (done["method"], done["path"], done["status"]) == ("POST", "/v1/completions", 200)
    assert done["duration_s"] > 0 and done["client"] == "127.0.0.1"
