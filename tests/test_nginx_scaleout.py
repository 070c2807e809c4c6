"""Scale-out: two real replicas behind a real nginx running the shipped config; one is killed.

The nginx config is deploy/nginx/gptserve.conf with its proxy include (least_conn, no buffering,
failover before the first byte), pointed at two `python -m service` processes on loopback ports.

The kill is synchronised on events, never on time: four streams are opened through nginx with a
``max_tokens`` so large that none can end during the test, and each is read until it has delivered
a few events, so every stream is in flight, on a replica nginx named, when one replica is
SIGKILLed. Then every stream on the killed replica must break, every stream on the survivor must
keep streaming, and the broken streams' retries and new requests must all complete on the
survivor (nginx fails over while nothing has reached the client).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time

import httpx
import pytest
from deploy_support import (
    ServerProcess,
    free_port,
    make_tiny_checkpoint,
    stream_completion,
    write_nginx_conf,
)

STREAMS = 4
NEVER_ENDS = 1_000_000  # max_tokens no stream can reach while the test runs
EVENTS_BEFORE_KILL = 3  # events every stream must have delivered before the kill
EVENTS_AFTER_KILL = 3  # more events each stream on the survivor must deliver after it
WAIT = 60.0  # the most any one wait lasts (a bound; the waits end on events)


class HeldStream:
    """A streaming completion through nginx, read in a thread until it breaks or is stopped."""

    def __init__(self, url: str, seed: int) -> None:
        self.url = url
        self.seed = seed
        self.upstream: str | None = None  # the replica nginx chose (its last attempt)
        self.events = 0
        self.error: str | None = None  # why it broke
        self.finished = False  # saw a finish_reason or [DONE]: must never happen here
        self.ended = False
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> HeldStream:
        self._thread.start()
        return self

    def wait_for(self, predicate, what: str) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: predicate(self), WAIT), (
                f"stream {self.seed} on {self.upstream}: timed out waiting for {what} "
                f"({self.events} events, error={self.error})"
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)

    def _update(self, **changes) -> None:
        with self._changed:
            for name, value in changes.items():
                setattr(self, name, value)
            self._changed.notify_all()

    def _run(self) -> None:
        body = {"prompt": "ab", "max_tokens": NEVER_ENDS, "stream": True, "temperature": 1.0,
                "seed": self.seed}  # fmt: skip
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body,
                              timeout=WAIT) as resp:  # fmt: skip
                upstream = resp.headers.get("x-upstream-addr", "?").split(",")[-1].strip()
                self._update(upstream=upstream)
                if resp.status_code != 200:
                    self._update(error=f"HTTP {resp.status_code}")
                    return
                for line in resp.iter_lines():
                    if self._stop.is_set():
                        return
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    done = data == "[DONE]" or any(
                        c.get("finish_reason") for c in json.loads(data)["choices"]
                    )
                    self._update(events=self.events + 1, finished=self.finished or done)
            if not self._stop.is_set():
                self._update(error="the stream ended without [DONE]")
        except httpx.HTTPError as err:
            self._update(error=repr(err))
        finally:
            self._update(ended=True)


@pytest.mark.timeout(180)
def test_killing_a_replica_breaks_only_its_streams_and_the_survivor_takes_over(tmp_path):
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
    streams: list[HeldStream] = []
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

        streams = [HeldStream(url, seed).start() for seed in range(STREAMS)]
        for s in streams:
            s.wait_for(lambda s: s.events >= EVENTS_BEFORE_KILL or s.ended, "its first events")
        assert not any(s.ended or s.finished for s in streams), [vars(s) for s in streams]
        on_victim = [s for s in streams if s.upstream == victim]
        on_survivor = [s for s in streams if s.upstream == survivor]
        assert on_victim and on_survivor and len(on_victim) + len(on_survivor) == STREAMS, (
            f"least_conn should spread {STREAMS} streams over both replicas: "
            f"{[s.upstream for s in streams]}"
        )
        seen_at_kill = {s.seed: s.events for s in on_survivor}

        replicas[0].kill()

        for s in on_victim:
            s.wait_for(lambda s: s.ended, "the killed replica's stream to break")
            assert s.error and not s.finished, f"a stream on the killed replica did not break: {vars(s)}"
        for s in on_survivor:
            s.wait_for(
                lambda s: s.events >= seen_at_kill[s.seed] + EVENTS_AFTER_KILL or s.ended,
                "the survivor's stream to go on",
            )
            assert not s.ended, f"a stream on the surviving replica broke: {vars(s)}"

        # The clients retry what broke, and new requests arrive: all complete on the survivor.
        with httpx.Client(timeout=WAIT) as client:
            results = [
                stream_completion(client, url, "ab", max_tokens=16, temperature=1.0, seed=seed)
                for seed in range(len(on_victim) + STREAMS)
            ]
        for r in results:
            assert r.complete, f"a request after the kill did not complete: {r}"
            assert r.headers["x-upstream-addr"].split(",")[-1].strip() == survivor, r.headers
        print(f"{len(on_victim)} streams broke with the killed replica, {len(on_survivor)} "
              f"went on; {len(results)} requests after the kill completed on the survivor")  # fmt: skip
    finally:
        for s in streams:
            s.stop()
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
