"""deploy/: the Dockerfile, compose file and Helm chart name only entry points and flags that exist.

No Docker engine, Kubernetes API server or Helm binary runs here. The chart's templates use plain
value substitution and whole-line ``if`` / ``if not`` / ``else`` / ``end`` on a value, so this
test renders them itself (a stand-in for `helm template` that understands exactly that subset
and fails on anything else), in both layouts (split services, and ``embedded: true``), then
checks every manifest.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.config import build_parser
from services.gateway.config import GatewayConfig
from services.history.config import HistoryConfig
from services.router.config import RouterConfig
from services.tokenizer.config import TokenizerConfig
from services.worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "sglmesh"
CONFIGS = {"gateway": GatewayConfig, "history": HistoryConfig, "router": RouterConfig,
           "tokenizer": TokenizerConfig, "worker": WorkerConfig}
SUBSTITUTION = re.compile(r"\{\{\s*\.(Values|Release)\.([A-Za-z0-9_.]+)\s*\}\}")
CONTROL = re.compile(r"^\s*\{\{-?\s*(if not|if|else|end)\s*(?:\.Values\.([A-Za-z0-9_.]+))?"
                     r"\s*-?\}\}\s*$")


def render_chart(release: str = "demo", **values_set: Any) -> list[dict[str, Any]]:
    """The chart's manifests; ``values_set`` overrides top-level values (``--set k=v``)."""
    values = {**yaml.safe_load((CHART / "values.yaml").read_text()), **values_set}
    scopes = {"Values": values, "Release": {"Name": release, "Namespace": "default"}}

    def value(scope: str, path: str) -> Any:
        node: Any = scopes[scope]
        for key in path.split("."):
            assert isinstance(node, dict) and key in node, f"undefined value .{scope}.{path}"
            node = node[key]
        return node

    docs = []
    for template in sorted((CHART / "templates").glob("*.yaml")):
        kept: list[str] = []
        emitting: list[bool] = []  # one entry per open if-block
        for line in template.read_text().splitlines(keepends=True):
            control = CONTROL.match(line)
            if control is None:
                if all(emitting):
                    kept.append(line)
                continue
            kind, path = control.groups()
            if kind in ("if", "if not"):
                assert path, f"{template.name}: `if` on something other than a value"
                emitting.append(bool(value("Values", path)) == (kind == "if"))
            else:
                assert emitting, f"{template.name}: `{kind}` outside an if-block"
                if kind == "else":
                    emitting[-1] = not emitting[-1]
                else:
                    emitting.pop()
        assert not emitting, f"{template.name}: unclosed if-block"
        rendered = SUBSTITUTION.sub(lambda m: str(value(m.group(1), m.group(2))), "".join(kept))
        assert "{{" not in rendered, f"{template.name}: template syntax beyond the subset"
        docs += [d for d in yaml.safe_load_all(rendered) if d]
    return docs


def parse_service_args(args: list[str]) -> argparse.Namespace:
    service, flags = args[0], args[1:]
    assert service in CONFIGS, f"unknown service entry point {service!r}"
    parser = build_parser(CONFIGS[service])
    try:
        return parser.parse_args(flags)
    except SystemExit as exc:  # argparse reports an unknown flag by exiting
        raise AssertionError(f"`sglmesh {' '.join(args)}` is rejected by the CLI") from exc


@pytest.fixture(scope="module", params=[False, True], ids=["split", "embedded"])
def manifests(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render_chart(embedded=request.param)


def _embedded(manifests: list[dict[str, Any]]) -> bool:
    return "demo-router" not in _deployments(manifests)


def _router_args(manifests: list[dict[str, Any]]) -> argparse.Namespace:
    """The router's flags: its own Deployment's, or the gateway's --router-args (embedded)."""
    deployments = _deployments(manifests)
    if not _embedded(manifests):
        return parse_service_args(
            deployments["demo-router"]["spec"]["template"]["spec"]["containers"][0]["args"])
    gateway = parse_service_args(
        deployments["demo-gateway"]["spec"]["template"]["spec"]["containers"][0]["args"])
    assert gateway.router == "embedded" and gateway.tokenizer == "embedded"
    return parse_service_args(["router", *shlex.split(gateway.router_args)])


def _deployments(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Deployment"}


def test_chart_renders_to_well_formed_manifests(manifests: list[dict[str, Any]]) -> None:
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["apiVersion"] == "v2"
    for manifest in manifests:
        assert {"apiVersion", "kind", "metadata"} <= set(manifest)
        assert manifest["metadata"]["name"].startswith("demo")
    kinds = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    in_gateway = {"router", "tokenizer"} if _embedded(manifests) else set()
    for service in CONFIGS:
        for kind in ("Deployment", "Service"):
            assert ((kind, f"demo-{service}") in kinds) == (service not in in_gateway), service
    assert ("HorizontalPodAutoscaler", "demo-tokenizer") in kinds or in_gateway
    assert {"ConfigMap", "ServiceAccount", "Role", "RoleBinding",
            "HorizontalPodAutoscaler"} <= {kind for kind, _ in kinds}


def test_every_container_command_is_a_real_cli_invocation(manifests) -> None:
    for name, deployment in _deployments(manifests).items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod["containers"]:
            args = parse_service_args(container["args"])
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert args.port in ports.values(), f"{name}: --port {args.port} not exposed"
            for probe_name in ("readinessProbe", "livenessProbe"):
                probe = container[probe_name]
                if "grpc" in probe:  # grpc.health.v1 on the service port
                    assert probe["grpc"]["port"] == args.port, name
                else:
                    assert probe["httpGet"]["port"] in ports, name


def test_gateway_probe_paths_exist(manifests) -> None:
    from services.gateway.server import create_app

    routes = {getattr(r, "path", None) for r in create_app(GatewayConfig()).routes}
    gateway = _deployments(manifests)["demo-gateway"]
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    for probe_name in ("readinessProbe", "livenessProbe"):
        assert container[probe_name]["httpGet"]["path"] in routes


def test_selectors_match_pod_labels(manifests) -> None:
    deployments = _deployments(manifests)
    for deployment in deployments.values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in (m for m in manifests if m["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in deployments.values()), service["metadata"]["name"]
    worker = deployments["demo-worker"]["spec"]["template"]["metadata"]["labels"]
    assert worker["sglmesh.io/discovery"] == "sglmesh-worker"
    # The router (its own pods, or the gateway's when embedded) discovers exactly those pods,
    # on the workers' gRPC port.
    args = _router_args(manifests)
    assert args.service_discovery is True
    assert all(worker.get(k) == v for k, v in (s.split("=", 1) for s in args.selector))
    worker_port = parse_service_args(
        deployments["demo-worker"]["spec"]["template"]["spec"]["containers"][0]["args"]).port
    assert args.service_discovery_port == worker_port


def test_router_can_watch_pods(manifests) -> None:
    role = next(m for m in manifests if m["kind"] == "Role")
    assert role["rules"][0]["resources"] == ["pods"]
    assert {"list", "watch"} <= set(role["rules"][0]["verbs"])
    watcher = "demo-gateway" if _embedded(manifests) else "demo-router"
    pod = _deployments(manifests)[watcher]["spec"]["template"]["spec"]
    binding = next(m for m in manifests if m["kind"] == "RoleBinding")
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]


def test_compose_file(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "otel-collector", *CONFIGS} <= set(services)
    for name in CONFIGS:
        args = parse_service_args(services[name]["command"])
        assert args.host == "0.0.0.0"
        assert args.otlp_endpoint == "otel-collector:4317"
    assert "postgresql+asyncpg://" in " ".join(services["history"]["command"])


def test_dockerfile_entry_point() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["sglmesh"]' in text
    assert re.search(r"^USER sglmesh$", text, re.M)
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd is not None
    parse_service_args(yaml.safe_load(cmd.group(1)))
    assert "ARG VARIANT=cpu" in text and '"$VARIANT" = "cuda"' in text
