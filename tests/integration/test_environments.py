"""Per-deployment environments, built with uv from PyPI: the server never needs a deployment's packages.

These tests install small packages from the package index into environments
under pytest's temporary directory; the server's own environment is checked
to be left as it was.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from conftest import REPO, Server, run_cli

MODULE = '''
from framework import deployment


@deployment(python_packages=["humanize==4.9.0"])
def old_humanize(x):
    import humanize
    return [humanize.__version__, humanize.intcomma(x)]


@deployment(python_packages=["humanize==4.11.0"])
def new_humanize(x):
    import humanize
    return [humanize.__version__, humanize.intcomma(x)]


@deployment(python_packages=["no-such-package-framework-test==1.0"])
def missing(x):
    return x


@deployment
def plain(x):
    return x + 1
'''


def _freeze() -> str:
    return subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert importlib.util.find_spec("humanize") is None, "the server's environment must lack humanize"
    project = tmp_path_factory.mktemp("envs")
    (project / "mod.py").write_text(textwrap.dedent(MODULE))
    (project / "deploy.yaml").write_text(f"modules: [mod]\nserver: {{env_dir: {project / 'envs'}}}\n")
    run_cli("deploy", store=project / "store", cwd=project)
    return project


@pytest.fixture(scope="module")
def server(project: Path) -> Iterator[Server]:
    before = _freeze()
    srv = Server(project / "store", cwd=project)
    yield srv
    srv.stop()
    assert _freeze() == before  # the server's own environment is unchanged


def test_two_versions_of_one_package_are_served_side_by_side(server: Server) -> None:
    with ThreadPoolExecutor(2) as pool:
        old, new = pool.map(lambda name: server.post(f"/v1/{name}/latest", {"data": 1234567}),
                            ["old_humanize", "new_humanize"])
    assert old.json() == {"data": ["4.9.0", "1,234,567"]}, old.text
    assert new.json() == {"data": ["4.11.0", "1,234,567"]}, new.text
    assert server.post("/v1/old_humanize/latest", {"data": [[1, 1000]]}).json() == {
        "data": [[1, ["4.9.0", "1,000"]]]}
    assert server.post("/v1/plain/latest", {"data": 1}).json() == {"data": 2}  # in the server
    assert importlib.util.find_spec("humanize") is None


def test_a_package_that_does_not_exist_is_a_4xx_naming_it_and_is_not_retried_per_call(
        server: Server, project: Path) -> None:
    first = server.post("/v1/missing/latest", {"data": 1})
    assert first.status_code == 424, first.text
    assert "no-such-package-framework-test" in first.json()["error"]
    [log] = [p for p in (project / "envs").glob("*.log") if "no-such-package" in p.read_text()]
    mtime = log.stat().st_mtime_ns
    again = server.post("/v1/missing/latest", {"data": 1})
    assert again.status_code == 424 and again.json() == first.json()
    assert log.stat().st_mtime_ns == mtime  # the build log is kept, and no new build ran


def test_framework_build_ahead_means_the_first_call_builds_nothing(tmp_path: Path, project: Path) -> None:
    env_dir = tmp_path / "envs"
    config = tmp_path / "deploy.yaml"
    config.write_text(f"modules: [mod]\nserver: {{env_dir: {env_dir}}}\n")
    store = project / "store"
    # Two builds at once, as two replicas starting together: one builds, one waits and reuses.
    with ThreadPoolExecutor(2) as pool:
        builds = list(pool.map(lambda _: run_cli("--config", str(config), "build", "old_humanize",
                                                 store=store, cwd=project, timeout=600), range(2)))
    assert any("old_humanize v1 (main): built" in b.stderr for b in builds), builds[0].stderr
    assert any("already built" in b.stderr for b in builds) or all("built" in b.stderr for b in builds)
    logs = {p: p.stat().st_mtime_ns for p in env_dir.glob("*.log")}
    assert len(logs) == 1
    server = Server(store, cwd=project, FRAMEWORK_CONFIG=str(config))
    try:
        assert server.post("/v1/old_humanize/latest", {"data": 5}).json() == {"data": ["4.9.0", "5"]}
    finally:
        server.stop()
    assert {p: p.stat().st_mtime_ns for p in env_dir.glob("*.log")} == logs
    failing = run_cli("--config", str(config), "build", "missing", store=store, cwd=project,
                      check=False, timeout=600)
    assert failing.returncode == 1 and "FAILED" in failing.stderr
    assert "no-such-package-framework-test" in failing.stderr


def test_a_call_shorter_than_the_build_gets_503_naming_it_then_the_version_is_served(
        tmp_path: Path, project: Path) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text(f"modules: [mod]\nserver: {{env_dir: {tmp_path / 'envs'}}}\n")
    server = Server(project / "store", cwd=project, FRAMEWORK_CONFIG=str(config))
    try:
        early = server.post("/v1/new_humanize/latest", {"data": 1, "timeout_seconds": 0.05})
        assert early.status_code == 503, early.text
        assert "humanize==4.11.0" in early.json()["error"] and "being built" in early.json()["error"]
        assert early.headers["Retry-After"]
        for _ in range(600):  # bounded: until the build is done, at most about 60 s
            answer = server.post("/v1/new_humanize/latest", {"data": 1, "timeout_seconds": 0.1})
            if answer.status_code != 503:
                break
        assert answer.status_code != 503, answer.text
        # Built: served with the default time limit. A first call on a loaded machine can take
        # longer than the 0.1 s above, and that 504 would say nothing about the build.
        answer = server.post("/v1/new_humanize/latest", {"data": 1})
        assert answer.json() == {"data": ["4.11.0", "1"]}
    finally:
        server.stop()


def test_prebuild_builds_before_readyz_says_ready(tmp_path: Path, project: Path) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text(f"modules: [mod]\nserver: {{env_dir: {tmp_path / 'envs'}, prebuild: true}}\n")
    server = Server(project / "store", cwd=project, FRAMEWORK_CONFIG=str(config))
    try:
        first = httpx.get(f"{server.url}/readyz", timeout=10)
        assert first.status_code == 503 and "server.prebuild" in first.json()["error"]
        for _ in range(1200):  # bounded
            if httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200:
                break
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
        assert len(list((tmp_path / "envs").glob("*/bin/python"))) == 2  # both humanize versions
        assert server.post("/v1/old_humanize/latest", {"data": 7}).json() == {"data": ["4.9.0", "7"]}
    finally:
        server.stop()


def _other_python() -> str | None:
    here = "%d.%d" % sys.version_info[:2]
    candidates = [shutil.which(f"python3.{minor}") for minor in (12, 13, 10)]
    candidates += sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.1[0-9]*/bin/python3.1[0-9]")))
    for path in filter(None, candidates):
        out = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() not in ("", here):
            return path
    return None


def test_a_version_built_with_another_python_is_served_by_that_python_where_installed(
        tmp_path: Path) -> None:
    python = _other_python()
    if python is None:
        pytest.skip("no Python other than the server's on this machine to deploy from")
    from uv import find_uv_bin

    venv = tmp_path / "other"
    env = {"UV_SYSTEM_CERTS": "1", "UV_NATIVE_TLS": "1", **os.environ}  # as the server builds
    subprocess.run([find_uv_bin(), "venv", "-q", "--python", python, str(venv)], check=True, env=env)
    subprocess.run([find_uv_bin(), "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                    "cloudpickle", "pyyaml", "orjson", "click"], check=True, timeout=600, env=env)
    (tmp_path / "m.py").write_text(
        "import sys\nfrom framework import deployment\n\n\n@deployment\ndef which(x):\n"
        "    return [x, '%d.%d' % sys.version_info[:2]]\n")
    store = tmp_path / "store"
    (tmp_path / "deploy.yaml").write_text(f"modules: [m]\nstore: {store}\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "framework", "deploy"], cwd=tmp_path,
                   env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, check=True, timeout=300)
    other = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True).stdout.strip()
    (tmp_path / "deploy.yaml").write_text(
        f"modules: [m]\nstore: {store}\nserver: {{env_dir: {tmp_path / 'envs'}}}\n")
    server = Server(store, cwd=tmp_path, PATH="/usr/bin:/bin")  # where no other Python is found
    try:
        refused = server.post("/v1/which/latest", {"data": 1})
        assert refused.status_code == 409 and f"Python {other}" in refused.json()["error"]
        assert "%d.%d" % sys.version_info[:2] in refused.json()["error"]
    finally:
        server.stop()
    (tmp_path / "deploy.yaml").write_text(
        f"modules: [m]\nstore: {store}\nserver: {{env_dir: {tmp_path / 'envs'}, pythons: [{python}]}}\n")
    server = Server(store, cwd=tmp_path)
    try:
        assert server.post("/v1/which/latest", {"data": 1}).json() == {"data": [1, other]}
    finally:
        server.stop()
