"""Bad input never crashes the server: 4xx with one error envelope naming the parameter."""

from __future__ import annotations

import threading

import httpx
import pytest
from conftest import LiveServer, live_server, wait_until

import service.app
from service.settings import Settings

pytestmark = pytest.mark.timeout(120)
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json", **AUTH}

# (name, raw body or None, extra headers, path, expected status, expected param)
CASES = [
    ("malformed_json", b'{"prompt": "a",', {}, None, 400, None),
    ("body_is_an_array", b"[1, 2]", {}, None, 400, None),
    ("invalid_utf8", b'{"prompt": "\xff\xfe"}', {}, None, 400, None),
    ("missing_prompt", b'{"max_tokens": 2}', {}, None, 400, "prompt"),
    ("empty_prompt", b'{"prompt": ""}', {}, None, 400, "prompt"),
    ("empty_prompt_list", b'{"prompt": []}', {}, None, 400, "prompt"),
    ("empty_token_list", b'{"prompt": [[]]}', {}, None, 400, "prompt"),
    ("mixed_prompt_list", b'{"prompt": [["a"]]}', {}, None, 400, "prompt"),
    ("token_id_past_vocab", b'{"prompt": [1, 99999]}', {}, None, 400, "prompt"),
    ("negative_token_id", b'{"prompt": [-1]}', {}, None, 400, "prompt"),
    ("char_not_in_vocab", '{"prompt": "日本"}'.encode(), {}, None, 400, "prompt"),
    ("temperature_string", b'{"prompt": "a", "temperature": "hot"}', {}, None, 400, "temperature"),
    ("temperature_nan", b'{"prompt": "a", "temperature": NaN}', {}, None, 400, "temperature"),
    (
        "temperature_infinity",
        b'{"prompt": "a", "temperature": Infinity}',
        {},
        None,
        400,
        "temperature",
    ),
    ("temperature_negative", b'{"prompt": "a", "temperature": -1}', {}, None, 400, "temperature"),
    ("top_p_zero", b'{"prompt": "a", "top_p": 0}', {}, None, 400, "top_p"),
    ("top_p_above_one", b'{"prompt": "a", "top_p": 1.5}', {}, None, 400, "top_p"),
    ("top_k_negative", b'{"prompt": "a", "top_k": -1}', {}, None, 400, "top_k"),
    ("min_p_above_one", b'{"prompt": "a", "min_p": 2}', {}, None, 400, "min_p"),
    ("max_tokens_zero", b'{"prompt": "a", "max_tokens": 0}', {}, None, 400, "max_tokens"),
    ("max_tokens_string", b'{"prompt": "a", "max_tokens": "16"}', {}, None, 400, "max_tokens"),
    ("max_tokens_float", b'{"prompt": "a", "max_tokens": 1.5}', {}, None, 400, "max_tokens"),
    ("max_tokens_huge", b'{"prompt": "a", "max_tokens": 1e300}', {}, None, 400, "max_tokens"),
    ("n_zero", b'{"prompt": "a", "n": 0}', {}, None, 400, "n"),
    ("n_too_large", b'{"prompt": "a", "n": 1000}', {}, None, 400, "n"),
    ("logprobs_above_5", b'{"prompt": "a", "logprobs": 6}', {}, None, 400, "logprobs"),
    ("logprobs_negative", b'{"prompt": "a", "logprobs": -1}', {}, None, 400, "logprobs"),
    ("stop_empty_string", b'{"prompt": "a", "stop": [""]}', {}, None, 400, "stop"),
    ("stop_number", b'{"prompt": "a", "stop": 5}', {}, None, 400, "stop"),
    ("seed_negative", b'{"prompt": "a", "seed": -1}', {}, None, 400, "seed"),
    (
        "presence_penalty_range",
        b'{"prompt": "a", "presence_penalty": 3}',
        {},
        None,
        400,
        "presence_penalty",
    ),
    (
        "frequency_penalty_range",
        b'{"prompt": "a", "frequency_penalty": -3}',
        {},
        None,
        400,
        "frequency_penalty",
    ),
    (
        "repetition_penalty_zero",
        b'{"prompt": "a", "repetition_penalty": 0}',
        {},
        None,
        400,
        "repetition_penalty",
    ),
    ("logit_bias_bad_key", b'{"prompt": "a", "logit_bias": {"x": 1}}', {}, None, 400, "logit_bias"),
    (
        "logit_bias_id_past_vocab",
        b'{"prompt": "a", "logit_bias": {"99999": 1}}',
        {},
        None,
        400,
        "logit_bias",
    ),
    (
        "logit_bias_value_range",
        b'{"prompt": "a", "logit_bias": {"1": 1000}}',
        {},
        None,
        400,
        "logit_bias",
    ),
    ("echo_string", b'{"prompt": "a", "echo": "yes"}', {}, None, 400, "echo"),
    ("stream_string", b'{"prompt": "a", "stream": "true"}', {}, None, 400, "stream"),
    ("user_number", b'{"prompt": "a", "user": 5}', {}, None, 400, "user"),
    ("suffix", b'{"prompt": "a", "suffix": "b"}', {}, None, 400, "suffix"),
    ("best_of_below_n", b'{"prompt": "a", "n": 3, "best_of": 2}', {}, None, 400, "best_of"),
    ("best_of_above_max_n", b'{"prompt": "a", "best_of": 17}', {}, None, 400, "best_of"),
    (
        "best_of_streamed",
        b'{"prompt": "a", "best_of": 2, "stream": true}',
        {},
        None,
        400,
        "best_of",
    ),
    ("best_of_string", b'{"prompt": "a", "best_of": "2"}', {}, None, 400, "best_of"),
    ("lone_surrogate", b'{"prompt": "a\\ud800"}', {}, None, 400, "prompt"),
    ("tokenize_lone_surrogate", b'{"prompt": "\\udfff"}', {}, "/tokenize", 400, "prompt"),
    ("chat_malformed_json", b'{"messages": [', {}, "/v1/chat/completions", 400, None),
    ("chat_wrong_type", b'{"messages": "hi"}', {}, "/v1/chat/completions", 400, "messages"),
    (
        "stream_options_without_stream",
        b'{"prompt": "a", "stream_options": {"include_usage": true}}',
        {},
        None,
        400,
        "stream_options",
    ),
    ("unknown_model", b'{"prompt": "a", "model": "gpt-5"}', {}, None, 404, "model"),
    ("body_too_large", b'{"prompt": "' + b"a" * 5000 + b'"}', {}, None, 413, None),
    (
        "not_json_content_type",
        b"prompt=a",
        {"Content-Type": "application/x-www-form-urlencoded"},
        None,
        415,
        None,
    ),
    ("missing_api_key", b'{"prompt": "a"}', {"Authorization": ""}, None, 401, None),
    ("wrong_api_key", b'{"prompt": "a"}', {"Authorization": "Bearer nope"}, None, 401, None),
    ("tokenize_missing_prompt", b"{}", {}, "/tokenize", 400, "prompt"),
    ("detokenize_bad_id", b'{"tokens": [99999]}', {}, "/detokenize", 400, "tokens"),
    ("detokenize_wrong_type", b'{"tokens": "abc"}', {}, "/detokenize", 400, "tokens"),
]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with live_server(tiny_checkpoint, api_key=KEY, max_request_bytes=4096) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_the_battery_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize(
    ("body", "headers", "path", "status", "param"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_bad_input_gets_an_error_envelope_and_the_server_keeps_serving(
    http, body, headers, path, status, param
):
    resp = http.post(path or "/v1/completions", content=body, headers={**JSON, **headers})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param, error
    assert error["message"] and isinstance(error["type"], str)
    ok = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2}, headers=AUTH)
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 2


def test_unknown_route_and_method_use_the_envelope(http):
    assert http.get("/nope", headers=AUTH).json()["error"]["type"] == "not_found_error"
    resp = http.get("/v1/completions", headers=AUTH)
    assert resp.status_code == 405 and "error" in resp.json()


def test_probes_the_page_and_metrics_are_open_but_the_api_needs_the_key(http):
    """``--api-key`` once locked the web page (it has its own key box) and /metrics (vLLM
    keys only /v1; ``--metrics-auth`` keys it, see test_metrics_auth_puts_metrics_behind_the_key)."""
    for path in ("/health", "/ready", "/", "/favicon.ico", "/metrics"):
        assert http.get(path).status_code == 200, path
    for path in ("/v1/models", "/openapi.json", "/docs"):
        resp = http.get(path)
        assert resp.status_code == 401, path
        assert resp.json()["error"]["code"] == "invalid_api_key"
        assert http.get(path, headers=AUTH).status_code == 200, path
    metrics = http.get("/metrics", headers=AUTH).text
    assert KEY not in metrics


def test_metrics_auth_puts_metrics_behind_the_key(tiny_checkpoint):
    with live_server(tiny_checkpoint, api_key=KEY, metrics_auth=True) as srv:
        bare = httpx.get(f"{srv.url}/metrics", timeout=30)
        keyed = httpx.get(f"{srv.url}/metrics", headers=AUTH, timeout=30)
        page = httpx.get(f"{srv.url}/", timeout=30)
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    assert keyed.status_code == 200 and "gptserve_" in keyed.text
    assert page.status_code == 200, "the web page is open whatever guards /metrics"


def test_chunked_body_over_the_limit_is_413(http):
    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    resp = http.post("/v1/completions", content=chunks(), headers=JSON)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"


def test_an_engine_failure_is_a_500_envelope_and_the_server_recovers(tiny_checkpoint):
    with live_server(tiny_checkpoint) as srv:
        core = srv.state.engine._core
        real_step = core.step
        failures = []

        def failing_step():
            if not failures:
                failures.append(1)
                raise RuntimeError("injected failure")
            return real_step()

        core.step = failing_step
        resp = httpx.post(
            srv.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 4}, timeout=30
        )
        assert resp.status_code == 500, resp.text
        assert resp.json()["error"]["code"] == "engine_error"
        ok = httpx.post(
            srv.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 4}, timeout=30
        )
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 4
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'gptserve_request_success_total{finish_reason="error"} 1.0' in metrics


def test_while_the_checkpoint_loads_health_answers_and_ready_and_work_get_503(
    tiny_checkpoint, monkeypatch
):

    release = threading.Event()
    real_load = service.app.load_engine

    def slow_load(settings):
        assert release.wait(60), "the test never released the load"
        return real_load(settings)

    monkeypatch.setattr(service.app, "load_engine", slow_load)
    app = service.app.create_app(Settings.create(checkpoint=tiny_checkpoint, device="cpu"))
    with LiveServer(app, wait_ready=False) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        ready = httpx.get(srv.url + "/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
        work = httpx.post(srv.url + "/v1/completions", json={"prompt": "ab"}, timeout=30)
        assert work.status_code == 503 and work.headers["Retry-After"].isdigit()
        assert httpx.get(srv.url + "/v1/models").status_code == 503
        release.set()
        wait_until(  # the engine-core process starts now: imports, load and warm-up
            lambda: httpx.get(srv.url + "/ready").status_code == 200,
            timeout=90,
            what="the engine to load and step",
        )
        ok = httpx.post(
            srv.url + "/v1/completions", json={"prompt": "ab", "max_tokens": 2}, timeout=30
        )
        assert ok.status_code == 200


def _rejected(http, reason: str) -> float:
    for line in http.get("/metrics", headers=AUTH).text.splitlines():
        if line.startswith(f'gptserve_request_rejected_total{{reason="{reason}"}} '):
            return float(line.split()[-1])
    raise AssertionError(f"no rejected series for {reason}")


def test_schema_errors_count_as_invalid_rejections_on_both_endpoints(http):
    bad = [
        (path, body, headers)
        for path in ("/v1/completions", "/v1/chat/completions")
        for body, headers in (
            (b'{"prompt": "a",', {}),  # malformed JSON
            (b"[1, 2]", {}),  # not an object
            (b'{"prompt": 5, "messages": 5}', {}),  # wrong types
            (b'{"prompt": "a", "messages": [], "temperature": "hot"}', {}),
            (b'{"prompt": "\xff"}', {}),  # invalid UTF-8
            (b"prompt=a", {"Content-Type": "text/plain"}),  # not JSON at all
        )
    ]
    before = _rejected(http, "invalid")
    for path, body, headers in bad:
        resp = http.post(path, content=body, headers={**JSON, **headers})
        assert 400 <= resp.status_code < 500, (path, body, resp.text)
    assert _rejected(http, "invalid") - before == len(bad)


def test_unknown_fields_are_ignored_with_a_warning_as_vllm_does(http, caplog):
    body = {"prompt": "abc", "max_tokens": 6, "temperature": 0}
    plain = http.post("/v1/completions", json=body, headers=AUTH)
    with caplog.at_level("WARNING", logger="service.api"):
        extra = http.post(
            "/v1/completions", json={**body, "best_of_all": 2, "top_a": 0.5}, headers=AUTH
        )
    assert extra.status_code == 200, extra.text
    assert extra.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    warned = [r.getMessage() for r in caplog.records if "unknown request field" in r.getMessage()]
    assert warned and "'best_of_all'" in warned[0] and "'top_a'" in warned[0], warned
