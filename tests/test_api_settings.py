"""Settings: every flag has a GPTSERVE_* twin, flags win over the environment, --help explains."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import wait_until

from service.engine import EngineConfig
from service.settings import DEFAULT_CHECKPOINT, Settings, build_parser, parse_settings
from service.transport.limits import TransportLimits

ENGINE_KNOBS = {f.name for f in EngineConfig.knobs()}
TRANSPORT_LIMITS = {f.name for f in TransportLimits.knobs()}

FLAGS = {
    "--checkpoint": ("/tmp/ckpt", Path("/tmp/ckpt")),
    "--host": ("0.0.0.0", "0.0.0.0"),
    "--port": ("9001", 9001),
    "--device": ("cpu", "cpu"),
    "--dtype": ("bfloat16", "bfloat16"),
    "--model-name": ("bard", "bard"),
    "--max-batch-size": ("7", 7),
    "--max-queue": ("9", 9),
    "--kv-memory": ("64M", 64 * 1024 * 1024),
    "--window-shift": ("4", 4),
    "--batch-invariant": ("on", True),
    "--prefix-caching": ("off", False),
    "--max-request-sequences": ("12", 12),
    "--kv-memory-fraction": ("0.5", 0.5),
    "--prefill-chunk": ("64", 64),
    "--max-tokens-per-step": ("300", 300),
    "--compile": ("1", True),
    "--cuda-graphs": ("off", False),
    "--cpu-kernels": ("off", False),
    "--threads": ("3", 3),
    "--grammar-cache": ("8", 8),
    "--grammar-timeout": ("2.5", 2.5),
    "--max-grammar-bytes": ("4k", 4096),
    "--quantization": ("int8", "int8"),
    "--api-key": ("k3y", "k3y"),
    "--cors-origins": ("http://a.test, http://b.test", ("http://a.test", "http://b.test")),
    "--request-timeout": ("12.5", 12.5),
    "--shutdown-timeout": ("3", 3.0),
    "--log-level": ("debug", "debug"),
    "--max-request-bytes": ("2k", 2048),
    "--max-n": ("4", 4),
    "--watch": ("1", True),
    "--watch-interval": ("0.5", 0.5),
    "--max-header-bytes": ("8k", 8192),
    "--max-headers": ("50", 50),
    "--header-timeout": ("4.5", 4.5),
    "--body-timeout": ("12", 12.0),
    "--keep-alive-timeout": ("2.5", 2.5),
    "--max-connections": ("300", 300),
    "--max-pipelined": ("4", 4),
    "--metrics-auth": ("true", True),
    "--log-format": ("json", "json"),
    "--chat-template": ("{{ messages[0].content }}", "{{ messages[0].content }}"),
    "--load-timeout": ("7.5", 7.5),
    "--engine-core": ("thread", "thread"),
    "--api-servers": ("3", 3),
}


def _field(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _env(flag: str) -> str:
    return "GPTSERVE_" + _field(flag).upper()


def test_every_settings_field_engine_knob_and_transport_limit_has_a_flag():
    fields = (set(Settings.__dataclass_fields__) - {"engine", "transport"}) | ENGINE_KNOBS
    assert fields | TRANSPORT_LIMITS == {_field(f) for f in FLAGS}, \
        "a Settings field lacks a flag (or the test)"


def _value(settings: Settings, name: str):
    """A setting, an engine knob or a transport limit: each config is held whole, not copied."""
    if name in ENGINE_KNOBS:
        return getattr(settings.engine, name)
    return getattr(settings.transport if name in TRANSPORT_LIMITS else settings, name)


def test_each_flag_takes_its_help_from_its_field():
    """One definition per knob: a flag's help text is its field's (no second copy to drift)."""
    parser = build_parser({})
    fields = [f for f in Settings.__dataclass_fields__.values() if f.name not in
              ("engine", "transport")] + [*EngineConfig.knobs(), *TransportLimits.knobs()]
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        assert helps[flag].startswith(f.metadata["help"].replace("%", "%%")), flag


@pytest.mark.parametrize(("typo", "meant"), [("--chekpoint", "--checkpoint"),
                                             ("--max-conections", "--max-connections"),
                                             ("--api-kye=x", "--api-key")])  # fmt: skip
def test_a_mistyped_flag_names_the_closest_one_in_one_line(typo, meant, capsys):
    """``--chekpoint`` printed 25 lines of usage and no hint."""
    with pytest.raises(SystemExit) as exc:
        parse_settings([typo, "x"], environ={})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"did you mean {meant}?" in err, err
    assert len(err.splitlines()) <= 2, err


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_each_flag_and_its_env_twin_set_the_same_field(flag):
    raw, value = FLAGS[flag]
    from_flag = parse_settings([flag, raw], environ={})
    from_env = parse_settings([], environ={_env(flag): raw})
    assert _value(from_flag, _field(flag)) == value
    assert _value(from_env, _field(flag)) == value


def test_flag_overrides_environment():
    settings = parse_settings(["--port", "1234"], environ={"GPTSERVE_PORT": "999"})
    assert settings.port == 1234


def test_defaults_serve_shipped_weights_on_loopback_8000():
    settings = parse_settings([], environ={})
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.checkpoint == DEFAULT_CHECKPOINT
    assert DEFAULT_CHECKPOINT.parent.name == "weights" and DEFAULT_CHECKPOINT.is_absolute()
    assert settings.served_model_name == "shakespeare-char"


def test_invalid_values_exit_with_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_settings(["--max-batch-size", "0"], environ={})
    assert exc.value.code == 2
    assert "max_batch_size" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--header-timeout", "0"), ("--body-timeout", "nan"), ("--keep-alive-timeout", "-1"),
     ("--max-headers", "0"), ("--max-header-bytes", "0"), ("--max-connections", "0"),
     ("--max-pipelined", "0"), ("--log-format", "xml"), ("--engine-core", "fork")],
)  # fmt: skip
def test_transport_limits_and_log_format_refuse_values_that_cannot_work(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_settings([flag, value], environ={})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert _field(flag) in err or flag in err, err


def test_help_explains_every_flag_and_never_shows_the_key():
    text = build_parser({"GPTSERVE_API_KEY": "do-not-print"}).format_help()
    for flag in FLAGS:
        assert flag in text and _env(flag) in text, f"--help does not explain {flag}"
    assert "do-not-print" not in text
    assert "do-not-print" not in repr(
        parse_settings([], environ={"GPTSERVE_API_KEY": "do-not-print"})
    )


@pytest.mark.timeout(60)
def test_console_entry_points_print_help():
    for cmd in ([sys.executable, "-m", "service", "--help"], ["gptserve", "--help"]):
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "--shutdown-timeout" in proc.stdout


@pytest.mark.timeout(60)
def test_missing_checkpoint_fails_fast_with_a_clear_message(tmp_path):
    proc = subprocess.run(  # noqa: PLW1510 - the exit code is the assertion
        [sys.executable, "-m", "service", "--checkpoint", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "cannot load checkpoint" in proc.stderr and "nope" in proc.stderr


@pytest.mark.timeout(120)
def test_python_m_service_serves_the_shipped_weights_from_any_directory(tmp_path):
    """No --checkpoint: the path comes from the package, not the working directory."""

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        if not DEFAULT_CHECKPOINT.exists():
            assert proc.wait(60) == 2
            assert str(DEFAULT_CHECKPOINT) in (tmp_path / "log").read_text()
            return
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "log").read_text()
            try:
                return httpx.get(url + "/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout=90, what="the shipped weights to load")
        models = httpx.get(url + "/v1/models").json()["data"]
        assert models[0]["id"] == "shakespeare-char"
        resp = httpx.post(
            url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 8}, timeout=60
        )
        assert resp.status_code == 200 and len(resp.json()["choices"][0]["text"]) > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.timeout(120)
def test_a_corrupt_checkpoint_stops_the_server_with_exit_2(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"format": "gptserve", "format_version": 1}')
    proc = subprocess.run(  # noqa: PLW1510 - the exit code is the assertion
        [sys.executable, "-m", "service", "--checkpoint", str(bad), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 2, proc.stderr
    assert "cannot load checkpoint" in proc.stderr and str(bad) in proc.stderr


def test_batch_invariance_is_opt_in_and_reaches_the_engine():
    from service.app import engine_config

    assert engine_config(parse_settings([], environ={})).batch_invariant is False
    on = parse_settings(["--batch-invariant", "on"], environ={})
    assert engine_config(on).batch_invariant is True


def test_the_api_docs_list_every_flag():
    docs = (Path(__file__).resolve().parent.parent / "docs" / "API.md").read_text()
    flags = [a.option_strings[0] for a in build_parser({})._actions if a.option_strings]
    missing = [f for f in flags if f not in ("-h",) and f"`{f}" not in docs]
    assert not missing, f"docs/API.md does not list: {missing}"
