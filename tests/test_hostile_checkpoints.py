"""Bad checkpoints, hostile or careless, against a real server: each is one clean refusal.

Every case of ``hostile_support.CASES`` is tried three ways:
- ``POST /admin/reload`` on a real ``python -m service`` process: a 4xx error envelope whose
  message says what is wrong (never a file's contents), one more failed reload counted, and the
  old model still serving;
- the server's own start-up load (``service.app.load_engine``, what the lifespan runs): one
  ``CheckpointError`` with the same message, never another exception type;
- a handful through a real ``python -m service --checkpoint BAD`` start: exit 2 and one line.
"""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest
from deploy_support import ROOT, ServerProcess, child_env, free_port, make_tiny_checkpoint
from hostile_support import CASES, SECRET_LINE

from model.checkpoint import CheckpointError
from service.app import load_engine
from service.settings import Settings

KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BY_NAME = {case.name: case for case in CASES}


def _failed_reloads(server: ServerProcess) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=10).text
    match = re.search(r'^gptserve_model_reloads_total\{result="failed"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("live")
    live = make_tiny_checkpoint(folder / "live", seed=0, provenance={"iterations": 100})
    proc = ServerProcess(live, folder / "server.log", ("--api-key", KEY))
    proc.start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reload_answers_a_bad_checkpoint_with_one_clean_4xx(server, case, tmp_path):
    path = case.build(tmp_path)
    failed = _failed_reloads(server)
    resp = httpx.post(
        f"{server.url}/admin/reload", json={"checkpoint": str(path)}, headers=AUTH, timeout=30
    )
    assert 400 <= resp.status_code < 500, f"{case.name}: {resp.status_code} {resp.text}"
    error = resp.json()["error"]
    assert error["code"] == "invalid_checkpoint" and error["param"] == "checkpoint", error
    assert re.search(case.says, error["message"], re.I | re.S), (
        f"{case.name}: the refusal should match {case.says!r}: {error['message']}"
    )
    assert SECRET_LINE not in resp.text, "a refusal echoed the contents of a file"
    assert _failed_reloads(server) == failed + 1, "the refusal was not counted as a failed reload"
    card = httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=10).json()["data"][0]
    assert card["checkpoint"]["iteration"] == 100, "the old model stopped serving"
    done = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "ab", "max_tokens": 3},
        headers=AUTH,
        timeout=30,
    )
    assert done.status_code == 200, done.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_start_up_load_refuses_a_bad_checkpoint_with_one_checkpoint_error(case, tmp_path):
    path = case.build(tmp_path)
    settings = Settings.create(checkpoint=path, device="cpu", max_batch_size=4)
    with pytest.raises(CheckpointError) as info:
        load_engine(settings)
    message = str(info.value)
    assert "\n" not in message, f"{case.name}: the message is not one line: {message!r}"
    assert re.search(case.says, message, re.I | re.S), f"{case.name}: {message}"
    assert SECRET_LINE not in message


START_CASES = [
    "n_layer-1e9",
    "tokenizer-a-string",
    "config-fifo",
    "path-symlink-loop",
    "path-missing",
    "hf-eps-a-string",
]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", START_CASES)
def test_server_start_on_a_bad_checkpoint_exits_2_with_one_line(name, tmp_path):
    case = BY_NAME[name]
    path = case.build(tmp_path)
    argv = [sys.executable, "-m", "service", "--checkpoint", str(path), "--device", "cpu",
            "--port", str(free_port())]  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=80, check=False)  # fmt: skip
    assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gptserve:")]
    assert len(lines) == 1, f"{name}: expected one 'gptserve:' line:\n{proc.stderr[-3000:]}"
    assert re.search(case.says, lines[0], re.I), f"{name}: {lines[0]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
