"""/metrics from the engine core's own counts (service/engine/counters.py), on a real server: a
known workload gives the counts the old per-token path gave (n requests of m tokens: n*(m-1)
inter-token gaps), with the core on a thread or in its own process, and a live reload keeps every
count (the retired core's stay in the sums)."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest
from conftest import live_server
from deploy_support import make_tiny_checkpoint

pytestmark = pytest.mark.timeout(180)
KEY = "metrics-core-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
N, M = 4, 6  # requests, tokens each
CORE_HISTOGRAMS = ("gptserve_time_to_first_token_seconds", "gptserve_e2e_request_latency_seconds",
                   "gptserve_request_queue_time_seconds")


def scrape(url: str) -> tuple[str, dict[str, float]]:
    text = httpx.get(url + "/metrics", timeout=30).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return text, samples


def complete(url: str, prompt: str, max_tokens: int, stream: bool) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": stream, "temperature": 1.0}
    answer = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert answer.status_code == 200, answer.text


def workload(url: str, requests: int) -> None:
    """``requests`` completions of M tokens each, streamed and not."""
    for i in range(requests):
        complete(url, "abc"[: 1 + i % 3], M, stream=bool(i % 2))


def check_counts(samples: dict[str, float], requests: int) -> None:
    """What the old path (one observe per gap, in the front end) counted for this workload."""
    itl = samples["gptserve_inter_token_latency_seconds_count"]
    assert itl == requests * (M - 1), f"{itl} inter-token gaps for {requests} x {M} tokens"
    assert samples['gptserve_inter_token_latency_seconds_bucket{le="+Inf"}'] == itl
    for name in CORE_HISTOGRAMS:
        assert samples[f"{name}_count"] == requests, f"{name}: one per finished choice"
    assert samples["gptserve_generation_tokens_total"] == requests * M
    assert samples["gptserve_batch_size_sum"] == requests * M, "one row per generated token"
    assert samples["gptserve_engine_step_seconds_count"] >= M
    assert samples['gptserve_request_success_total{finish_reason="length"}'] == requests
    assert samples["gptserve_request_generation_tokens_count"] == requests
    assert 0 < samples["gptserve_inter_token_latency_seconds_sum"] < samples[
        "gptserve_e2e_request_latency_seconds_sum"]


def promtool_accepts(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; CI installs it)")
    check = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                           capture_output=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("engine_core", ["thread", "process"])
def test_a_known_workload_counts_what_the_old_path_counted_and_a_reload_keeps_it(
        tmp_path, engine_core):
    first = make_tiny_checkpoint(tmp_path / "first", seed=1, provenance={"iterations": 100})
    make_tiny_checkpoint(tmp_path / "second", seed=2, provenance={"iterations": 200})
    with live_server(first, api_key=KEY, engine_core=engine_core) as server:
        workload(server.url, N)
        text, before = scrape(server.url)
        check_counts(before, N)
        promtool_accepts(text)

        reload = httpx.post(f"{server.url}/admin/reload", headers=AUTH, timeout=60,
                            json={"checkpoint": str(tmp_path / "second")})
        assert reload.status_code == 200 and reload.json()["status"] == "reloaded", reload.text
        _, between = scrape(server.url)  # the first core retires: none of its counts go
        for key, value in before.items():
            if key.startswith(("gptserve_generation", "gptserve_inter", "gptserve_engine_step")):
                assert between[key] >= value, f"{key} went back at a reload"
        workload(server.url, N)
        text, after = scrape(server.url)
        check_counts(after, 2 * N)  # both cores' counts
        promtool_accepts(text)
