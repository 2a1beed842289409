"""kubernetes/ and the Dockerfile, checked offline: CI has no cluster and no Docker daemon.

`kubernetes-validate --strict` checks every manifest against the API's schemas
(bundled in the package, so nothing is downloaded), and the probe paths answer
on a real server. That the manifests agree with the server they run (the
ConfigMap's deploy.yaml loads, the grace period covers a call) and the
Dockerfile's user are checked in-process in tests/unit/test_kubernetes_manifests.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from conftest import KUBE, MANIFESTS, Server, kube_docs



def validate(*files: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    return subprocess.run([tool, "--strict", *map(str, files)], capture_output=True, text=True,
                          timeout=300)


def test_every_manifest_passes_strict_validation() -> None:
    kinds = {k.split("/")[0] for k in kube_docs()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ConfigMap", "Secret"} <= kinds
    proc = validate(*MANIFESTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_strict_validation_catches_a_misspelled_field(tmp_path: Path) -> None:
    broken = tmp_path / "deployment.yaml"
    broken.write_text((KUBE / "deployment.yaml").read_text().replace("readinessProbe", "readinesProbe"))
    proc = validate(broken)
    assert proc.returncode != 0 and "readinesProbe" in proc.stdout + proc.stderr


def test_the_probe_paths_answer_on_a_real_server(tmp_path: Path) -> None:
    server = Server(tmp_path / "store", cwd=tmp_path, log_dir=tmp_path)
    try:
        for path in ("/readyz", "/livez"):
            assert httpx.get(server.url + path, timeout=10).status_code == 200
    finally:
        server.stop()
