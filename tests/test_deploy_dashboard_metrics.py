"""The container and monitoring files hold against a real server.

Every series the dashboard, the alert rules and the autoscaler query exists in real /metrics;
the image's HEALTHCHECK and ENTRYPOINT work.

A real server on a tiny checkpoint serves a streamed completion and refuses a bad request; then
its /metrics text is scraped and every ``gptserve_*`` and ``process_*`` name (and every label a
panel groups or names by) in deploy/grafana, deploy/prometheus/rules.yml and deploy/k8s must appear
in it. The dashboard imports into any Grafana: its data source is a variable, never a hard-coded
uid, and every query filters by the ``job`` and ``instance`` variables; with the variables filled
in, promtool parses every query.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import httpx
import pytest
import yaml
from deploy_support import (
    ROOT,
    ServerProcess,
    child_env,
    free_port,
    make_tiny_checkpoint,
    stream_completion,
)

DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"\b(?:gptserve|process)_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b((?:gptserve|process)_[a-z0-9_]+)(\{[^}]*\})?")
LABEL_VALUES = re.compile(r"label_values\((\w+)(\{[^}]*\})?,\s*(\w+)\)")
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
TARGET_LABELS = {"instance", "job", "le"}  # added by Prometheus or the histogram itself


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    """A real server on a tiny checkpoint (the container's entrypoint, run from source)."""
    tmp = tmp_path_factory.mktemp("server")
    checkpoint = make_tiny_checkpoint(tmp / "ckpt", provenance={"iterations": 7})
    server = ServerProcess(checkpoint, tmp / "server.log").start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _scrape_after_traffic(server: ServerProcess) -> dict[str, set[str]]:
    """Sample name -> label names, after the server has served and refused requests."""
    with httpx.Client(timeout=30) as client:
        assert stream_completion(client, server.url, "ab", max_tokens=8).complete
        bad = client.post(f"{server.url}/v1/completions", json={"prompt": "ab", "n": 0})
        assert bad.status_code == 400
        text = client.get(f"{server.url}/metrics").text
    series: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        name = name.split(" ")[0]
        labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', rest)) if rest else set()
        series.setdefault(name, set()).update(labels)
    return series


def _dashboards() -> list[tuple[str, dict]]:
    paths = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    return [(path.name, json.loads(path.read_text())) for path in paths]


def _dashboard_queries() -> list[tuple[str, str, str]]:
    """(where, expr, legendFormat) for every panel target of every provisioned dashboard, and
    the series its query variables read (``label_values(series, label)``, legend: the label)."""
    out = []
    for name, board in _dashboards():
        for panel in board["panels"]:
            for t in panel["targets"]:
                out.append((f"{name}: {panel['title']}", t["expr"], t.get("legendFormat", "")))
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                series, matchers, label = LABEL_VALUES.fullmatch(var["query"]).groups()
                out.append((f"{name}: ${var['name']}", series + (matchers or ""), f"{{{{{label}}}}}"))
    return out


def _rule_queries() -> list[tuple[str, str, str]]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    return [
        (f"rules.yml: {r.get('alert') or r.get('record')}", r["expr"], "")
        for group in rules["groups"]
        for r in group["rules"]
    ]


def _autoscaler_queries() -> list[tuple[str, str, str]]:
    hpa = yaml.safe_load((DEPLOY / "k8s" / "hpa.yaml").read_text())
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    return [("k8s/hpa.yaml", name, "") for name in names]


@pytest.mark.timeout(120)
def test_every_queried_series_and_label_exists_in_real_metrics_output(live_server):
    series = _scrape_after_traffic(live_server)
    queries = _dashboard_queries() + _rule_queries() + _autoscaler_queries()
    assert len(queries) > 20, "expected the dashboard, the rules and the HPA to query metrics"
    problems = []
    for where, expr, legend in queries:
        names = METRIC.findall(expr)
        if not names and not expr.startswith("up{"):  # `up` is Prometheus' own series
            problems.append(f"{where}: queries no gptserve or process series: {expr}")
        for name in names:
            if name not in series:
                problems.append(f"{where}: {name} is not in /metrics")
        labels = {lab.strip() for group in GROUPING.findall(expr) for lab in group.split(",")}
        labels |= set(LEGEND_LABEL.findall(legend))
        available = set().union(*(series.get(n, set()) for n in names)) | TARGET_LABELS
        for label in labels - available - {""}:
            problems.append(f"{where}: label {label!r} is on none of {names}")
    assert not problems, "\n".join(problems)


def test_the_dashboard_names_no_datasource_uid_and_filters_every_query_by_job_and_instance():
    """Before: the datasource uid was hard-coded to `prometheus`; no job/instance selector."""
    for name, board in _dashboards():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        source = variables.get("DS_PROMETHEUS")
        assert source and (source["type"], source["query"]) == ("datasource", "prometheus"), name
        for var in ("job", "instance"):
            assert variables[var]["type"] == "query", f"{name}: ${var} is not a query variable"
            assert variables[var]["datasource"] == DATASOURCE, f"{name}: ${var}'s data source"
        for panel in board["panels"]:
            assert panel["datasource"] == DATASOURCE, f"{name}: {panel['title']}'s data source"
            for t in panel["targets"]:
                assert t["datasource"] == DATASOURCE, f"{name}: {panel['title']}: {t['expr']}"
                for series, matchers in SELECTOR.findall(t["expr"]):
                    assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, (
                        f"{name}: {panel['title']}: {series} is not filtered by $job and "
                        f"$instance: {t['expr']}"
                    )


def test_time_and_counts_never_share_a_panel():
    """Before: "Engine step and batch size" plotted seconds and counts on one axis."""
    for name, board in _dashboards():
        for panel in board["panels"]:
            exprs = [t["expr"] for t in panel["targets"]]
            seconds = [e for e in exprs if "_seconds" in e and "process_cpu" not in e]
            if seconds:
                assert panel["fieldConfig"]["defaults"]["unit"] == "s", panel["title"]
                assert seconds == exprs, f"{name}: {panel['title']} mixes seconds and counts"


@pytest.mark.timeout(60)
def test_every_dashboard_query_parses_with_its_variables_filled_in(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (CI installs it: see .ci/run)")
    rules = []
    for i, (_, expr, _) in enumerate(_dashboard_queries()):
        for var, value in VARIABLES.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, f"promtool:\n{proc.stdout}{proc.stderr}"


def _healthcheck_command() -> list[str]:
    """The Dockerfile's HEALTHCHECK CMD (exec form), with `python` as this interpreter."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"HEALTHCHECK .*?CMD (\[.*\])", text)
    assert match, "no exec-form HEALTHCHECK CMD in the Dockerfile"
    argv = json.loads(match.group(1))
    assert argv[0] == "python", argv
    return [sys.executable, *argv[1:]]


@pytest.mark.timeout(60)
def test_the_image_healthcheck_passes_on_a_live_server_and_fails_on_a_dead_port(live_server):
    argv = _healthcheck_command()
    env = child_env(GPTSERVE_PORT=str(live_server.port))
    ok = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert ok.returncode == 0, f"HEALTHCHECK failed against a live server: {ok.stderr[-500:]}"
    env["GPTSERVE_PORT"] = str(free_port())
    dead = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert dead.returncode != 0, "HEALTHCHECK passed with nothing listening"


def test_the_image_entrypoint_is_an_installed_command_that_takes_gptserve_env():
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"', (ROOT / "Dockerfile").read_text(), re.M)
    assert entry, "no exec-form ENTRYPOINT"
    assert shutil.which(entry.group(1)), f"{entry.group(1)} is not an installed command"
    out = subprocess.run([entry.group(1), "--help"], capture_output=True, text=True, timeout=60,
                         check=False)  # fmt: skip
    assert out.returncode == 0 and "GPTSERVE_CHECKPOINT" in out.stdout, out.stderr[-500:]
