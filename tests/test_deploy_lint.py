"""The deployment files lint clean with the tools that read them for real.

There is no Docker engine or Kubernetes cluster here, so each file is checked by the tool that
consumes it: hadolint (Dockerfile), docker-compose (compose files), promtool (Prometheus), nginx -t
(the load balancer), kubernetes-validate with its bundled OpenAPI schemas (manifests, offline).
A check whose tool is not installed is skipped with the reason; CI installs them all.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_MANIFESTS = sorted(K8S.glob("*.yaml"))


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} is not installed (CI installs it: see .ci/run and pyproject's dev extra)"
        )
    return path


def _run(argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(60)
def test_dockerfile_passes_hadolint():
    proc = _run([_tool("hadolint"), "Dockerfile"])
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_runs_as_non_root_with_a_healthcheck_on_health():
    text = (ROOT / "Dockerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) >= 2, "the Dockerfile should be multi-stage (build, runtime)"
    runtime = text.split(stages[-1], 1)[1]
    users = [line.split()[1] for line in runtime.splitlines() if line.startswith("USER ")]
    assert users and not users[-1].startswith(("0", "root")), f"runtime user is {users}"
    assert "HEALTHCHECK" in runtime and "/health" in runtime, "no HEALTHCHECK on /health"
    assert "ARG TORCH_VARIANT=cpu" in text, "the CPU torch build must be the default"


def test_dockerignore_keeps_every_copied_path_and_drops_runs_and_data():
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for name in ("runs", "data", ".git"):
        assert name in ignored, f".dockerignore lets {name}/ into the build context"
    copied = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            copied += [w for w in words[1:-1] if not w.startswith("--")]
    assert copied, "no COPY lines found"
    for src in copied:
        assert src.split("/")[0] not in ignored, f"COPY {src} is excluded by .dockerignore"
        assert (ROOT / src).exists() or src == "weights", f"COPY {src}: no such path in the repo"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "variant",
    [[], ["-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml"], ["--profile", "scale"]],
    ids=["default", "gpu-override", "scale-profile"],
)
def test_compose_file_validates_in_every_variant(variant):
    proc = _run([_tool("docker-compose"), *variant, "config"])
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    services = yaml.safe_load(proc.stdout)["services"]
    expected = {"gptserve", "prometheus", "grafana"}
    if "scale" in variant:
        expected |= {"replica", "nginx"}
    assert expected <= set(services), f"services {sorted(services)} lack {expected - set(services)}"
    for name in ("gptserve", "replica"):
        if name in services:
            env = services[name].get("environment", {})
            assert all(k.startswith(("GPTSERVE_", "OMP_")) for k in env), f"{name} env {env}"


@pytest.mark.timeout(60)
def test_prometheus_config_and_rules_pass_promtool():
    promtool = _tool("promtool")
    proc = _run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert proc.returncode == 0, f"promtool check config:\n{proc.stdout}{proc.stderr}"
    proc = _run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "rules.yml")])
    assert proc.returncode == 0, f"promtool check rules:\n{proc.stdout}{proc.stderr}"


@pytest.mark.timeout(60)
def test_nginx_config_passes_nginx_t(tmp_path):
    """The shipped server block and proxy include, with `replica` pointed at loopback."""
    nginx = _tool("nginx")
    from deploy_support import write_nginx_conf

    conf = write_nginx_conf(tmp_path, listen_port=18080, upstreams=["127.0.0.1:18001"])
    proc = _run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf)])
    assert proc.returncode == 0, f"nginx -t:\n{proc.stderr}"


def _kubernetes_validate():
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (PyPI, bundles the k8s schemas) missing"
    )


@pytest.mark.parametrize("manifest", K8S_MANIFESTS, ids=[p.name for p in K8S_MANIFESTS])
def test_k8s_manifest_matches_the_kubernetes_schema(manifest):
    kv = _kubernetes_validate()
    for doc in yaml.safe_load_all(manifest.read_text()):
        try:
            kv.validate(doc, kv.latest_version(), strict=True)
        except kv.ValidationError as err:
            pytest.fail(f"{manifest.name}: {err}")


def test_k8s_schema_check_rejects_a_misspelt_field():
    """Negative control: the validator used above does catch a typo in a probe."""
    kv = _kubernetes_validate()
    doc = yaml.safe_load((K8S / "deployment.yaml").read_text())
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, kv.latest_version(), strict=True)


def _deployment() -> dict:
    return yaml.safe_load((K8S / "deployment.yaml").read_text())


def test_k8s_grace_period_outlasts_prestop_plus_shutdown_timeout():
    pod = _deployment()["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    shutdown = float(env["GPTSERVE_SHUTDOWN_TIMEOUT"])
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop + shutdown, f"grace {grace}s <= preStop {pre_stop}s + drain {shutdown}s"


def test_k8s_probes_use_ready_for_readiness_and_health_for_liveness():
    container = _deployment()["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"


def test_hpa_scales_the_deployment_on_waiting_requests():
    hpa = yaml.safe_load((K8S / "hpa.yaml").read_text())
    assert hpa["spec"]["scaleTargetRef"]["name"] == _deployment()["metadata"]["name"]
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert names == ["gptserve_num_requests_waiting"], names
    adapter = (K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text()
    assert "gptserve_num_requests_waiting" in adapter, "prometheus-adapter does not expose it"


def test_grafana_dashboard_data_source_variable_picks_the_provisioned_prometheus():
    """The dashboard names no datasource uid (it imports into any Grafana): its DS_PROMETHEUS
    variable picks a datasource by type, and the compose stack provisions one of that type."""
    sources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "gptserve.json").read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert variable["type"] == "datasource"
    assert any(s["type"] == variable["query"] and s.get("isDefault") for s in sources["datasources"])
    assert dashboard["panels"], "the dashboard has no panels"
    for panel in dashboard["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} queries nothing"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_every_gptserve_variable_in_the_deploy_files_is_a_server_flag():
    """A misspelt GPTSERVE_* variable would be silently ignored by the server: catch it here.
    The one variable that is not a flag's twin is the kernel cache, which the model package
    reads (model.cpu_gemv.CACHE_VARIABLE)."""
    from model.cpu_gemv import CACHE_VARIABLE
    from service.settings import ENV_PREFIX, build_parser

    flags = {
        ENV_PREFIX + opt[2:].replace("-", "_").upper()
        for action in build_parser(environ={})._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help"
    } | {CACHE_VARIABLE}
    files = [ROOT / "Dockerfile", *ROOT.glob("docker-compose*.yml"), *K8S.rglob("*.yaml")]
    used = {}
    for path in files:
        for name in re.findall(r"\bGPTSERVE_[A-Z_]+\b", path.read_text()):
            used.setdefault(name, path.name)
    assert "GPTSERVE_CHECKPOINT" in used, "the deploy files should set the checkpoint"
    unknown = {name: where for name, where in used.items() if name not in flags}
    assert not unknown, f"not server flags: {unknown}"


def test_nginx_applies_the_replicas_own_transport_limits():
    """The limits are defined once (``TransportLimits``); nginx's copy in front of the replicas
    must agree with it, and drop idle upstream connections before a replica closes them."""
    from service.transport.limits import TransportLimits

    limits = TransportLimits()
    conf = (DEPLOY / "nginx" / "gptserve.conf").read_text()

    def value(directive: str) -> str:
        match = re.search(rf"^\s*{directive}\s+([^;]+);", conf, re.MULTILINE)
        assert match, f"gptserve.conf has no {directive}"
        return match.group(1).strip()

    assert value("client_header_timeout") == f"{limits.header_timeout:g}s"
    assert value("client_body_timeout") == f"{limits.body_timeout:g}s"
    assert value("large_client_header_buffers").split()[1] == f"{limits.max_header_bytes // 1024}k"
    assert float(value("keepalive_timeout").rstrip("s")) < limits.keep_alive_timeout
