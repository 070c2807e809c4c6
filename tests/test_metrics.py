"""/metrics: every series the issue names, in the right type, and valid for promtool."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest
from conftest import live_server

pytestmark = pytest.mark.timeout(120)
HISTOGRAMS = [
    "gptserve_time_to_first_token_seconds",
    "gptserve_inter_token_latency_seconds",
    "gptserve_e2e_request_latency_seconds",
    "gptserve_request_queue_time_seconds",
    "gptserve_engine_step_seconds",
    "gptserve_batch_size",
    "gptserve_request_prompt_tokens",
    "gptserve_request_generation_tokens",
]
GAUGES = [
    "gptserve_num_requests_running",
    "gptserve_num_requests_waiting",
    "gptserve_kv_cache_usage_ratio",
]
COUNTERS = [
    "gptserve_prompt_tokens_total",
    "gptserve_generation_tokens_total",
    "gptserve_request_success_total",
    "gptserve_request_rejected_total",
    "gptserve_client_disconnects_total",
    "gptserve_context_crops_total",
    "gptserve_recomputed_tokens_total",
    "gptserve_prefix_cache_queries_total",
    "gptserve_prefix_cache_hits_total",
]


@pytest.fixture(scope="module")
def exposition(tiny_checkpoint) -> str:
    with live_server(tiny_checkpoint, window_shift=1) as srv:
        post = lambda body: httpx.post(srv.url + "/v1/completions", json=body, timeout=30)  # noqa: E731
        assert post({"prompt": "abc", "max_tokens": 40}).status_code == 200  # past the window
        assert post({"prompt": "abc", "max_tokens": 4, "stream": True}).status_code == 200
        assert post({"prompt": "abc", "max_tokens": 4, "n": 2, "stop": "a"}).status_code == 200
        assert post({"prompt": ""}).status_code == 400
        return httpx.get(srv.url + "/metrics", timeout=30).text


def _types(text: str) -> dict[str, str]:
    return {
        line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")
    }


def test_every_named_series_is_exported_with_its_type(exposition):
    types = _types(exposition)
    for name in HISTOGRAMS:
        assert types.get(name) == "histogram", name
    for name in GAUGES:
        assert types.get(name) == "gauge", name
    for name in COUNTERS:
        assert types.get(name) == "counter", name
        assert f"\n{name}" in exposition, f"{name} has no sample"


def test_series_are_fed_by_real_traffic(exposition):
    samples = {}
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    assert samples["gptserve_generation_tokens_total"] >= 40 + 4 + 2
    # this once counted the sliding window's re-encoded tokens too (5,218 for prompts of
    # 19 tokens); now it counts prompt tokens only: "abc" alone, streamed, and for n=2 choices
    assert samples["gptserve_prompt_tokens_total"] == 3 + 3 + 2 * 3
    # every prompt is looked up; the first request slid its window past "abc", the streamed
    # one left "abc" + 3 tokens cached, and both n=2 choices reuse "ab" from it (the last prompt
    # token is always computed: its logits give the first token). The streamed request may
    # reuse up to 2 more: the first one samples at temperature 1, and its slid window may begin
    # with "a" or "ab" by chance
    assert samples["gptserve_prefix_cache_queries_total"] == 3 + 3 + 2 * 3
    assert 2 * 2 <= samples["gptserve_prefix_cache_hits_total"] <= 2 * 2 + 2
    assert samples["gptserve_recomputed_tokens_total"] > 0, "a window re-encoded after each crop"
    assert samples["gptserve_context_crops_total"] > 0, "40 tokens past a 32-token window"
    assert samples['gptserve_request_success_total{finish_reason="length"}'] >= 2
    assert samples['gptserve_request_rejected_total{reason="invalid"}'] == 1
    assert samples["gptserve_time_to_first_token_seconds_count"] >= 2
    assert samples["gptserve_engine_step_seconds_count"] > 0


def test_names_have_no_colons_and_labels_stay_low_cardinality(exposition):
    for line in exposition.splitlines():
        if line.startswith("gptserve"):
            name = line.split("{")[0].split(" ")[0]
            assert ":" not in name, line
            if "{" in line:
                labels = line[line.index("{") + 1 : line.index("}")]
                keys = {kv.split("=")[0] for kv in labels.split(",")}
                allowed = {"le", "finish_reason", "reason", "result"}
                if name == "gptserve_model_info":  # one series: the live checkpoint
                    allowed = {"checkpoint", "format", "iteration", "val_loss"}
                assert keys <= allowed, line


def test_promtool_accepts_the_exposition(exposition, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; CI installs it)")
    proc = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition,
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_cores_bucketing_equals_observing_one_value_at_a_time():
    """The core buckets a step's inter-token gaps with NumPy (several choices at once, never
    across two of them) and its other latencies with bisect: the exposition must equal
    prometheus_client's ``observe`` of every value, one by one."""
    import itertools

    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from service.engine.counters import LATENCY_BUCKETS, CoreCounters
    from service.metrics import CoreSeries

    # token times of three choices; their gaps hit bucket bounds exactly, fall between them,
    # and overflow the last one
    spans = [[0.0, 1e-4, 0.0051, 0.0101, 0.0201, 0.1201, 0.6201, 2.6201],
             [10.0, 10.005, 10.0075, 200.0],
             [5.0, 5.3]]
    latencies = [0.0, 0.001, 0.0031, 0.5, 7.5, 1e9]
    counters = CoreCounters.in_memory()
    for finished in (spans[:1], spans[1:]):  # one choice alone, then two in one step
        counters.add_finished([_finished(times) for times in finished], now=1e6)
    for value in latencies:  # a choice that never got a token: its end-to-end latency alone
        counters.add_finished([_finished([], arrival=0.0, finished=value)], now=value)
    one = CollectorRegistry()
    itl = Histogram("gptserve_inter_token_latency_seconds", "Time between consecutive "
                    "generated tokens of one choice.", buckets=LATENCY_BUCKETS, registry=one)
    e2e = Histogram("gptserve_e2e_request_latency_seconds", "Time from arrival to the last "
                    "token of a choice.", buckets=LATENCY_BUCKETS, registry=one)
    for span in spans:
        for a, b in itertools.pairwise(span):
            itl.observe(b - a)
        e2e.observe(span[-1] - span[0])
    for value in latencies:
        e2e.observe(value)
    core = CollectorRegistry()
    core.register(CoreSeries(lambda: [counters]))

    def series(registry, name) -> list[str]:  # every sample of one histogram, sum rounded
        lines = []
        for line in generate_latest(registry).decode().splitlines():
            if line.startswith(name) and "_created" not in line:
                key, value = line.rsplit(" ", 1)
                lines.append(f"{key} {round(float(value), 9)}")
        return lines

    for name in ("gptserve_inter_token_latency_seconds", "gptserve_e2e_request_latency_seconds"):
        want = series(one, name)
        assert want and series(core, name) == want, f"{name}: bucket counts or sum differ"


def _finished(token_times: list[float], arrival: float | None = None,
              finished: float | None = None):
    """A finished choice as the core's counts read it (arrival, admission, token and finish
    times): admitted at once; by default it arrived with its first token, ended with its last."""
    from types import SimpleNamespace

    arrival = token_times[0] if arrival is None else arrival
    return SimpleNamespace(request=SimpleNamespace(arrival_time=arrival), admitted_at=arrival,
                           token_times=token_times,
                           finished_at=token_times[-1] if finished is None else finished)
