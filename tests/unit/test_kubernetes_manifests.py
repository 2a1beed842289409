"""kubernetes/ and the Dockerfile agree with the server they run, read in-process.

tests/integration/test_s3_kubernetes.py runs `kubernetes-validate --strict` on the same
manifests and checks the probe paths on a real server.
"""

from __future__ import annotations

import re
from pathlib import Path


from conftest import REPO, kube_docs
from framework import config as cfgmod



def test_the_manifests_fit_the_server_they_run(tmp_path: Path) -> None:
    found = kube_docs()
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


def test_the_dockerfile_runs_the_server_as_a_non_root_user() -> None:
    text = (REPO / "Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and not user[-1].startswith(("0", "root"))
    assert 'ENTRYPOINT ["framework"]' in text
    assert '"serve", "--host", "0.0.0.0"' in text
    assert '[s3]' in text  # the image can open s3:// stores
