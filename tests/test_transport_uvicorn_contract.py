"""The transport guard extends uvicorn's httptools protocol: what it overrides and calls must exist.

``service.transport.protocol.GuardedHttpProtocol`` overrides parser callbacks and connection
methods of uvicorn's ``HttpToolsProtocol`` and calls some of its private helpers. uvicorn and
httptools are pinned in pyproject.toml for that reason; these tests fail on an upgrade that renames
or drops any of them, or changes an overridden method's parameters, before a silent regression
(a limit that no longer applies) can ship.
"""

from __future__ import annotations

import inspect
from importlib import metadata

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.transport.protocol import GuardedHttpProtocol

OURS = {"evictable", "evict"}  # methods the guard adds (the listener calls them)
CALLED = (  # uvicorn internals the guard reads or calls (besides what it overrides)
    "_unset_keepalive_if_required", "_should_upgrade", "_unsupported_upgrade_warning",
)


def _overridden() -> list[str]:
    names = []
    for name, value in vars(GuardedHttpProtocol).items():
        if callable(value) and name not in OURS and (not name.startswith("_") or
                                                     name == "__init__"):
            names.append(name)
    return names


def test_the_guard_overrides_public_methods_only():
    assert set(_overridden()) >= {
        "connection_made", "connection_lost", "data_received", "on_message_begin", "on_url",
        "on_header", "on_headers_complete", "on_message_complete", "on_response_complete",
    }, "the guard stopped overriding a callback this test expects: update the lists here"


@pytest.mark.parametrize("name", _overridden())
def test_every_overridden_uvicorn_method_still_exists_with_the_same_parameters(name):
    base = getattr(HttpToolsProtocol, name, None)
    version = metadata.version("uvicorn")
    assert base is not None, f"uvicorn {version}: HttpToolsProtocol.{name} is gone"
    ours = getattr(GuardedHttpProtocol, name)
    base_params = list(inspect.signature(base).parameters.values())
    our_params = list(inspect.signature(ours).parameters.values())
    if name == "__init__":  # ours passes uvicorn's required arguments and adds keyword-only ones
        our_params = [p for p in our_params if p.kind is not p.KEYWORD_ONLY]
        base_params = [p for p in base_params if p.default is p.empty]
    base_params = [p.name for p in base_params]
    our_params = [p.name for p in our_params]
    assert our_params == base_params, (
        f"uvicorn {version}: HttpToolsProtocol.{name}{inspect.signature(base)} no longer "
        f"matches the override {name}{inspect.signature(ours)}")


@pytest.mark.parametrize("name", CALLED)
def test_every_uvicorn_helper_the_guard_calls_still_exists(name):
    source = inspect.getsource(GuardedHttpProtocol)
    assert name in source, f"the guard no longer uses {name}: drop it from CALLED"
    assert callable(getattr(HttpToolsProtocol, name, None)), (
        f"uvicorn {metadata.version('uvicorn')}: HttpToolsProtocol.{name} is gone")


def test_uvicorn_and_httptools_run_at_the_versions_pyproject_pins():
    import tomllib
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    pins = {d.split("==")[0].split("[")[0]: d.split("==")[1]
            for d in deps["project"]["dependencies"] if "==" in d}
    for name in ("uvicorn", "httptools"):
        assert name in pins, f"pyproject.toml does not pin {name} exactly"
        assert metadata.version(name) == pins[name], (
            f"{name} {metadata.version(name)} is installed, pyproject.toml pins {pins[name]}")


def test_the_tests_live_servers_run_the_production_transport(tiny_checkpoint):
    """conftest's live servers are built by ``service.server.build_server``: the guard answers
    a request over the header limit with 431 there too (a plain uvicorn.Server would say 200)."""
    import httpx
    from conftest import live_server

    with live_server(tiny_checkpoint, max_headers=8) as srv:
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
        many = {f"x-extra-{i}": "1" for i in range(20)}
        resp = httpx.get(srv.url + "/health", headers=many, timeout=30)
        assert resp.status_code == 431, f"the fixture's server skipped the guard: {resp.status_code}"
