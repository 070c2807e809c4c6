"""The trainer-to-server hand-off: a real trainer writes checkpoints while clients stream.

One real server (`python -m service --watch`) serves `RUN/latest` while `python -m trainer train
--resume` rewrites that folder every few steps. Clients stream completions the whole time. Every
request must succeed, each client must see the checkpoint iteration never go backwards, and the
last requests must be answered by the trainer's last checkpoint. Then a bad checkpoint is swapped
in: it is refused (log line, metric) and the old model keeps serving.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import httpx
import pytest
from deploy_support import (
    ROOT,
    ServerProcess,
    StreamResult,
    child_env,
    corpus_file,
    stream_completion,
)

from model.checkpoint.atomic import atomic_folder

API_KEY = "reload-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TINY = [
    "--n-layer",
    "2",
    "--n-head",
    "2",
    "--n-embd",
    "32",
    "--block-size",
    "32",
    "--batch-size",
    "8",
    "--eval-interval",
    "5",
    "--eval-iters",
    "2",
    "--dropout",
    "0",
    "--warmup-iters",
    "2",
    "--device",
    "cpu",
    "--no-progress",
]
FINAL_ITER = 60
LONG = 1500  # tokens: a greedy stream long enough to be running across a switch


def _trainer(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "trainer", *argv]


def _iteration(result: StreamResult) -> int:
    match = re.fullmatch(r"it(\d+)-[0-9a-f]+", result.fingerprint or "")
    assert match, f"no checkpoint iteration in system_fingerprint {result.fingerprint!r}"
    return int(match.group(1))


def _live_model(server: ServerProcess) -> dict:
    card = httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=5).json()["data"][0]
    return card["checkpoint"]


def _metric(server: ServerProcess, line_prefix: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=5).text
    for line in text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_prefix} not in /metrics")


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class StreamingClients:
    """N threads, each streaming completions back to back until stopped; results per client."""

    def __init__(self, url: str, n: int, prompt: str) -> None:
        self.url = url
        self.prompt = prompt
        self.stop = threading.Event()
        self.results: list[list[StreamResult]] = [[] for _ in range(n)]
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, index: int) -> None:
        with httpx.Client(timeout=30, headers=AUTH) as client:
            while not self.stop.is_set():
                result = stream_completion(
                    client, self.url, self.prompt, max_tokens=16, temperature=0.8, seed=index
                )
                self.results[index].append(result)

    def __enter__(self) -> StreamingClients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


@pytest.mark.timeout(240)
def test_streams_never_fail_while_the_trainer_swaps_checkpoints_under_the_server(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    env = child_env()
    corpus = corpus_file(tmp_path)
    prompt = corpus.read_text()[:8]  # in the char vocabulary, whatever the corpus
    subprocess.run(
        _trainer(["prepare", "--input", str(corpus), "--tokenizer", "char", "--out", str(data)]),
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    subprocess.run(
        _trainer(["train", "--data", str(data), "--out", str(run), "--max-iters", "5", *TINY]),
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    server = ServerProcess(
        run / "latest",
        tmp_path / "server.log",
        ("--watch", "--watch-interval", "0.2", "--api-key", API_KEY, "--max-batch-size", "4"),
    )
    server.start()
    try:
        server.wait_ready()
        assert _live_model(server)["iteration"] == 5
        with StreamingClients(server.url, n=3, prompt=prompt) as clients:
            _wait_for(lambda: all(clients.results), 60, "a first completion on every client")
            trainer = subprocess.run(
                _trainer(
                    [
                        "train",
                        "--data",
                        str(data),
                        "--out",
                        str(run),
                        "--resume",
                        "--max-iters",
                        str(FINAL_ITER),
                        *TINY,
                    ]
                ),
                check=False,
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=150,
            )
            assert trainer.returncode == 0, f"trainer failed:\n{trainer.stderr[-2000:]}"
            _wait_for(
                lambda: _live_model(server)["iteration"] == FINAL_ITER,
                30,
                f"the server to serve iteration {FINAL_ITER}",
            )
            counts = [len(r) for r in clients.results]
            _wait_for(
                lambda: all(len(r) >= c + 2 for r, c in zip(clients.results, counts, strict=True)),
                60,
                "two more completions per client after the last switch",
            )
        results = [r for per_client in clients.results for r in per_client]
        failed = [r for r in results if not r.complete]
        assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:3]}"
        for per_client in clients.results:
            its = [_iteration(r) for r in per_client]
            assert its == sorted(its), f"a client saw the checkpoint go backwards: {its}"
            assert its[-1] == FINAL_ITER, f"last request answered by iteration {its[-1]}"
        seen = {_iteration(r) for r in results}
        reloads = _metric(server, 'gptserve_model_reloads_total{result="success"}')
        print(f"{len(results)} streams, iterations seen {sorted(seen)}, {reloads:.0f} reloads")
        assert len(seen) >= 2 and min(seen) == 5, f"iterations seen by clients: {sorted(seen)}"
        assert reloads >= 1
        assert _metric(server, 'gptserve_model_reloads_total{result="failed"}') == 0
        assert (
            _metric(
                server,
                f'gptserve_model_info{{checkpoint="{run / "latest"}",'
                f'format="gptserve",iteration="{FINAL_ITER}"',
            )
            == 1
        )

        # A bad checkpoint, swapped in atomically the trainer's way: refused, old model serves.
        good = run / "latest"
        with atomic_folder(good) as tmp:
            for name in ("config.json", "model.safetensors"):
                blob = (good / name).read_bytes()
                (tmp / name).write_bytes(
                    blob[: len(blob) // 2] if name.endswith("tensors") else blob
                )
        _wait_for(
            lambda: _metric(server, 'gptserve_model_reloads_total{result="failed"}') == 1,
            30,
            "the truncated checkpoint to be refused",
        )
        assert "checkpoint refused, the old model keeps serving" in server.log()
        assert _live_model(server)["iteration"] == FINAL_ITER
        with httpx.Client(timeout=30, headers=AUTH) as client:
            after = stream_completion(client, server.url, prompt, max_tokens=8)
        assert after.complete and _iteration(after) == FINAL_ITER, after
        assert "Traceback" not in server.log(), server.log()[-3000:]
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_admin_reload_needs_the_api_key_and_refuses_a_bad_checkpoint(tmp_path):
    """POST /admin/reload's contract (auth, "unchanged", a 400 naming the field, the switch, the
    metric) on the in-process server (conftest's ``live_server``: the app, uvicorn and reloader
    of ``python -m service``, the engine on a thread); the reloads that spawn an engine-core
    process are the other tests here and tests/test_reload_supervision.py's."""
    from conftest import live_server
    from deploy_support import make_tiny_checkpoint

    live = make_tiny_checkpoint(tmp_path / "best", seed=1, provenance={"iterations": 100})
    with live_server(live, api_key=API_KEY) as server:
        url = f"{server.url}/admin/reload"
        assert httpx.post(url, json={}, timeout=30).status_code == 401
        same = httpx.post(url, json={}, headers=AUTH, timeout=30)
        assert same.status_code == 200 and same.json()["status"] == "unchanged", same.text
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "config.json").write_text("{not json")
        bad = httpx.post(
            url, json={"checkpoint": str(tmp_path / "broken")}, headers=AUTH, timeout=30
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "checkpoint", bad.text
        assert _live_model(server)["iteration"] == 100
        make_tiny_checkpoint(tmp_path / "next", seed=2, provenance={"iterations": 200})
        new = httpx.post(url, json={"checkpoint": str(tmp_path / "next")}, headers=AUTH, timeout=60)
        assert new.status_code == 200 and new.json()["model"]["iteration"] == 200, new.text
        assert _live_model(server)["iteration"] == 200
        with httpx.Client(timeout=30, headers=AUTH) as client:
            answer = stream_completion(client, server.url, "ab", max_tokens=4)
        assert answer.complete and _iteration(answer) == 200, answer
        assert _metric(server, 'gptserve_model_reloads_total{result="failed"}') == 1


@pytest.mark.timeout(180)
def test_a_stream_in_flight_finishes_on_the_old_weights_while_new_requests_get_the_new(tmp_path):
    from deploy_support import make_tiny_checkpoint

    old = make_tiny_checkpoint(tmp_path / "old", seed=1, provenance={"iterations": 1})
    new = make_tiny_checkpoint(tmp_path / "new", seed=2, provenance={"iterations": 2})
    server = ServerProcess(old, tmp_path / "server.log", ("--api-key", API_KEY))
    server.start()
    request = {"prompt": "ab", "max_tokens": LONG, "temperature": 0}
    try:
        server.wait_ready()
        with httpx.Client(timeout=120, headers=AUTH) as client:
            alone = client.post(f"{server.url}/v1/completions", json=request).json()
            old_text = alone["choices"][0]["text"]
            assert len(old_text) == LONG, alone

            got_tokens = threading.Event()
            switch_done = threading.Event()
            streamed: list[StreamResult] = []

            def hold(_headers) -> None:
                # the client stops reading until the switch is done, so its request is in flight
                # across the switch however fast the engine is and however long a reload takes
                # (a reload spawns a new engine-core process: imports, load and warm-up)
                got_tokens.set()
                switch_done.wait(120)

            def stream() -> None:
                with httpx.Client(timeout=120, headers=AUTH) as c:
                    streamed.append(
                        stream_completion(c, server.url, "ab", LONG, temperature=0,
                                          on_headers=hold)
                    )  # fmt: skip

            reader = threading.Thread(target=stream)
            reader.start()
            assert got_tokens.wait(60), "the stream never started"
            switched = client.post(
                f"{server.url}/admin/reload", json={"checkpoint": str(new)}
            ).json()
            assert switched["status"] == "reloaded", switched
            still_running = reader.is_alive()
            switch_done.set()
            fresh = client.post(f"{server.url}/v1/completions", json=request).json()
            reader.join(120)
        assert still_running, "the stream ended before the switch: make it longer"
        (result,) = streamed
        assert result.complete, result
        assert result.text == old_text, "the in-flight stream changed weights mid-way"
        assert _iteration(result) == 1
        assert fresh["system_fingerprint"].startswith("it2-"), fresh["system_fingerprint"]
        assert fresh["choices"][0]["text"] != old_text, "the new weights gave the old text"
    finally:
        server.stop()
