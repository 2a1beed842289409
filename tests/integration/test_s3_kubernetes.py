"""kubernetes/ and the Dockerfile, checked offline: CI has no cluster and no Docker daemon.

`kubernetes-validate --strict` checks every manifest against the API's schemas
(bundled in the package, so nothing is downloaded). The rest checks that the
manifests agree with the server they run: the ConfigMap's deploy.yaml loads,
the probe paths answer on a real server, the grace period covers a call.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import REPO, Server
from framework import config as cfgmod

KUBE = REPO / "kubernetes"
MANIFESTS = sorted(KUBE.glob("*.yaml")) + sorted((KUBE / "examples").glob("*.yaml"))


def validate(*files: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    return subprocess.run([tool, "--strict", *map(str, files)], capture_output=True, text=True,
                          timeout=300)


def docs() -> dict[str, dict[str, Any]]:
    found = {}
    for f in MANIFESTS:
        for doc in yaml.safe_load_all(f.read_text()):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def test_every_manifest_passes_strict_validation() -> None:
    kinds = {k.split("/")[0] for k in docs()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ConfigMap", "Secret"} <= kinds
    proc = validate(*MANIFESTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_strict_validation_catches_a_misspelled_field(tmp_path: Path) -> None:
    broken = tmp_path / "deployment.yaml"
    broken.write_text((KUBE / "deployment.yaml").read_text().replace("readinessProbe", "readinesProbe"))
    proc = validate(broken)
    assert proc.returncode != 0 and "readinesProbe" in proc.stdout + proc.stderr


def test_the_manifests_fit_the_server_they_run(tmp_path: Path) -> None:
    found = docs()
    pod = found["Deployment/framework"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "framework-s3"
    assert env["FRAMEWORK_SIGNING_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "framework-signing"
    cache_mount = next(m for m in container["volumeMounts"]
                       if m["mountPath"] == env["FRAMEWORK_CACHE_DIR"]["value"])
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == cache_mount["name"])
    # The ConfigMap's deploy.yaml is one the real loader accepts ...
    config_file = tmp_path / "deploy.yaml"
    config_file.write_text(found["ConfigMap/framework-config"]["data"]["deploy.yaml"])
    cfg = cfgmod.load(config_file)
    assert cfg.store.startswith("s3://") and cfg.server["host"] == "0.0.0.0"
    # ... and the grace period outlasts the longest call it allows.
    assert pod["terminationGracePeriodSeconds"] > cfg.server["timeout_seconds"]
    selector = found["Service/framework"]["spec"]["selector"]
    assert selector == found["PodDisruptionBudget/framework"]["spec"]["selector"]["matchLabels"]
    assert found["HorizontalPodAutoscaler/framework"]["spec"]["scaleTargetRef"]["name"] == "framework"


def test_the_probe_paths_answer_on_a_real_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the server's log goes under tmp_path
    server = Server(tmp_path / "store", cwd=tmp_path)
    try:
        for path in ("/readyz", "/livez"):
            assert httpx.get(server.url + path, timeout=10).status_code == 200
    finally:
        server.stop()


def test_the_dockerfile_runs_the_server_as_a_non_root_user() -> None:
    text = (REPO / "Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and not user[-1].startswith(("0", "root"))
    assert 'ENTRYPOINT ["framework"]' in text
    assert '"serve", "--host", "0.0.0.0"' in text
    assert '[s3]' in text  # the image can open s3:// stores
