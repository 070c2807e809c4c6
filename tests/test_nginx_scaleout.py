"""Scale-out: two real replicas behind a real nginx running the shipped config; one is killed.

The nginx config is deploy/nginx/gptserve.conf with its proxy include (least_conn, no buffering,
failover before the first byte), pointed at two `python -m service` processes on loopback ports.
Streaming clients work through a fixed list of completions, retrying a completion whose stream
breaks. One replica is SIGKILLed while it has streams in flight. Every completion must finish, and
the only broken streams must be ones that were running on the killed replica when it died.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
from deploy_support import (
    ServerProcess,
    StreamResult,
    free_port,
    make_tiny_checkpoint,
    stream_completion,
    write_nginx_conf,
)

JOBS = 24  # completions the clients must get through
CLIENTS = 4
MAX_TOKENS = 160  # long enough that a stream is still running when the replica dies
MAX_ATTEMPTS = 4


@dataclass(frozen=True)
class Attempt:
    job: int
    upstream: str  # the replica that answered (the last one nginx tried)
    started: float
    ended: float
    result: StreamResult


class Load:
    """CLIENTS threads sharing a queue of JOBS completions; a broken stream is retried."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.lock = threading.Lock()
        self.next_job = 0
        self.attempts: list[Attempt] = []
        self.in_flight: dict[int, tuple[str, float]] = {}  # thread -> (upstream, started)
        self.completed: set[int] = set()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CLIENTS)]

    def _take(self) -> int | None:
        with self.lock:
            if self.next_job >= JOBS:
                return None
            self.next_job += 1
            return self.next_job - 1

    def _run(self, me: int) -> None:
        with httpx.Client(timeout=60) as client:
            while (job := self._take()) is not None:
                for _ in range(MAX_ATTEMPTS):
                    started = time.monotonic()
                    result = self._stream(client, me, job)
                    upstream = result.headers.get("x-upstream-addr", "").split(",")[-1].strip()
                    with self.lock:
                        self.in_flight.pop(me, None)
                        self.attempts.append(
                            Attempt(job, upstream, started, time.monotonic(), result)
                        )
                        if result.complete:
                            self.completed.add(job)
                    if result.complete:
                        break

    def _stream(self, client: httpx.Client, me: int, job: int) -> StreamResult:
        # stream_completion reads headers first; record the upstream as soon as they arrive by
        # marking this thread in flight before the call and filling the upstream afterwards.
        with self.lock:
            self.in_flight[me] = ("?", time.monotonic())
        return stream_completion(
            client, self.url, "ab", max_tokens=MAX_TOKENS, temperature=1.0, seed=job,
            on_headers=lambda h: self._mark(me, h),
        )  # fmt: skip

    def _mark(self, me: int, headers: dict[str, str]) -> None:
        with self.lock:
            upstream = headers.get("x-upstream-addr", "?").split(",")[-1].strip()
            self.in_flight[me] = (upstream, time.monotonic())

    def on(self, upstream: str) -> int:
        """Streams running on ``upstream`` now (their response headers have arrived)."""
        with self.lock:
            return sum(1 for u, _ in self.in_flight.values() if u == upstream)

    def completed_on(self, upstream: str) -> int:
        with self.lock:
            return sum(1 for a in self.attempts if a.upstream == upstream and a.result.complete)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)


@pytest.mark.timeout(180)
def test_clients_lose_only_streams_in_flight_on_a_killed_replica(tmp_path):
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("nginx is not installed (CI installs the Debian package: see .ci/run)")
    checkpoint = make_tiny_checkpoint(tmp_path / "ckpt", seed=3)
    replicas = [
        ServerProcess(checkpoint, tmp_path / f"replica{i}.log", ("--max-batch-size", "8"))
        for i in range(2)
    ]
    port = free_port()
    conf = write_nginx_conf(
        tmp_path / "nginx",
        listen_port=port,
        upstreams=[f"127.0.0.1:{r.port}" for r in replicas],
        extra_server_lines=("add_header X-Upstream-Addr $upstream_addr always;",),
    )
    proxy = None
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready()
        proxy = subprocess.Popen(
            [nginx, "-p", str(conf.parent), "-c", str(conf), "-g", "daemon off;"],
            stderr=subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{port}"
        _wait_for_proxy(url, proxy)
        victim, survivor = (f"127.0.0.1:{r.port}" for r in replicas)

        load = Load(url)
        load.start()
        deadline = time.monotonic() + 60
        while load.on(victim) == 0 or not load.completed_on(victim):
            assert time.monotonic() < deadline, "never saw a stream in flight on the victim"
            time.sleep(0.01)
        in_flight_at_kill = load.on(victim)
        replicas[0].kill()
        killed_at = time.monotonic()
        load.join(120)

        assert load.completed == set(range(JOBS)), (
            f"lost completions: {sorted(set(range(JOBS)) - load.completed)}"
        )
        broken = [a for a in load.attempts if not a.result.complete]
        served = {u: sum(a.upstream == u and a.result.complete for a in load.attempts)
                  for u in (victim, survivor)}  # fmt: skip
        print(
            f"{in_flight_at_kill} in flight on the victim at the kill, {len(broken)} broken, "
            f"completions per replica {served}"
        )
        assert broken, "killing a replica with streams in flight broke no stream"
        for a in broken:
            assert a.upstream == victim and a.started < killed_at, (
                f"a stream broke that was not in flight on the killed replica: {a}"
            )
        assert len(broken) <= CLIENTS, f"{len(broken)} broken streams for {CLIENTS} clients"
        after = [a for a in load.attempts if a.started > killed_at]
        assert after and all(a.upstream == survivor and a.result.complete for a in after), (
            "requests after the kill must all complete on the survivor"
        )
        assert {a.upstream for a in load.attempts if a.result.complete} == {victim, survivor}, (
            "least_conn should have spread the load over both replicas before the kill"
        )
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        for r in replicas:
            r.stop()


def _wait_for_proxy(url: str, proxy: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proxy.poll() is not None:
            raise RuntimeError(f"nginx exited: {proxy.stderr.read().decode()}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("nginx did not come up")
