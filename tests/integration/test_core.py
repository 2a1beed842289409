"""Deploy, packaging, manifest and store: real files, real subprocesses, real pickles.

The registry's in-process checks are in tests/unit/test_registry.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, cli_env, run_cli

from framework.store.local import LocalStore


def make_project(root: Path, files: dict[str, str], modules: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "deploy.yaml").write_text(f"modules: {json.dumps(modules)}\n")
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def run_python(code: str, *, cwd: Path, store: Path | None = None, timeout: float = 120) -> str:
    """Run `code` in a fresh interpreter as `__main__`, like a notebook cell."""
    env = cli_env(store) if store else cli_env("unused")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


LOAD_AND_CALL = """
    import importlib.util, json, sys
    from framework.execute.loading import load
    from framework.store.local import LocalStore
    assert importlib.util.find_spec("deployments") is None, "the project must not be importable here"
    store = LocalStore(sys.argv[1] if len(sys.argv) > 1 else {store!r})
    branch, name, ref, args = {branch!r}, {name!r}, {ref!r}, {args!r}
    version = store.resolve(branch, name, ref)
    loaded = load(store.read_artifact(branch, name, version), store.read_manifest(branch, name, version))
    print(json.dumps(loaded.fn(*args)))
"""


def call_in_fresh_process(store: Path, name: str, args: list, *, ref: str = "latest",
                          branch: str = "main", cwd: Path) -> object:
    code = LOAD_AND_CALL.format(store=str(store), branch=branch, name=name, ref=ref, args=args)
    return json.loads(run_python(code, cwd=cwd))


# -- deploy, unchanged, manifest -----------------------------------------------------


def test_deploy_prints_a_table_and_is_idempotent(tmp_path):
    store = tmp_path / "store"
    first = run_cli("deploy", store=store).stdout
    assert "example_doubler" in first and "new" in first and "SIZE" in first
    second = run_cli("deploy", store=store).stdout
    assert "new" not in second and second.count("unchanged") == 4
    assert LocalStore(store).versions("main", "example_doubler") == [1]


def test_only_changed_deployments_get_a_new_version(tmp_path):
    store = tmp_path / "store"
    project = make_project(tmp_path / "p", {
        "pkg/__init__.py": "",
        "pkg/helpers.py": "def scale():\n    return 2\n",
        "pkg/deps.py": """
            from framework import deployment
            from pkg.helpers import scale

            @deployment
            def a(x):
                return x * scale()

            @deployment
            def b(x):
                return x
        """}, ["pkg.deps"])
    run_cli("deploy", store=store, cwd=project)
    (project / "pkg/helpers.py").write_text("def scale():\n    return 3\n")
    out = run_cli("deploy", store=store, cwd=project).stdout
    assert [line.split()[3] for line in out.splitlines()[1:]] == ["new", "unchanged"]
    assert call_in_fresh_process(store, "a", [5], cwd=tmp_path) == 15
    assert call_in_fresh_process(store, "a", [5], ref="1", cwd=tmp_path) == 10


def test_manifest_has_every_field(tmp_path):
    store = tmp_path / "store"
    run_cli("deploy", store=store)
    shown = json.loads(run_cli("show", "example_adder", store=store).stdout)
    for key in ("name", "branch", "version", "created_at", "sha256", "python", "cloudpickle",
                "framework", "requirements", "signature", "options", "source", "git"):
        assert key in shown, key
    assert shown["version"] == 1 and shown["branch"] == "main"
    assert "def example_adder(a: int, b: int, c: int)" in shown["source"]
    assert [p["name"] for p in shown["signature"]["parameters"]] == ["a", "b", "c"]
    iris = json.loads(run_cli("show", "iris_species", "1", store=store).stdout)
    assert "numpy" in iris["requirements"]["detected"]


def test_list_and_versions(tmp_path):
    store = tmp_path / "store"
    run_cli("deploy", store=store)
    listing = run_cli("list", store=store).stdout
    assert {line.split()[0] for line in listing.splitlines()[1:]} == {
        "example_doubler", "example_dict_doubler", "example_adder", "iris_species"}
    versions = run_cli("versions", "example_doubler", store=store).stdout
    manifest = LocalStore(store).read_manifest("main", "example_doubler", 1)
    assert manifest["sha256"][:12] in versions
    missing = run_cli("versions", "nope", store=store, check=False)
    assert missing.returncode == 5 and "nope" in missing.stderr


# -- by value ------------------------------------------------------------------------


def test_examples_load_in_an_interpreter_without_the_project(tmp_path, examples_store):
    assert call_in_fresh_process(examples_store, "example_adder", [1, 2, 3], cwd=tmp_path) == 6
    answer = call_in_fresh_process(examples_store, "iris_species", [6.7, 3.0, 5.7, 2.2], cwd=tmp_path)
    assert answer["species"] == "virginica"


def test_large_model_globals_travel_inside_the_artifact(tmp_path):
    store = tmp_path / "store"
    project = make_project(tmp_path / "p", {"big.py": """
        import numpy as np
        from framework import deployment
        WEIGHTS = np.random.default_rng(1).normal(size=(1000, 1000))  # 8 MB

        @deployment
        def total(i: int):
            return float(WEIGHTS[i].sum())
    """}, ["big"])
    run_cli("deploy", store=store, cwd=project)
    assert LocalStore(store).read_manifest("main", "total", 1)["size"] > 8_000_000
    expected = run_python("import numpy as np; print(float(np.random.default_rng(1).normal("
                          "size=(1000, 1000))[3].sum()))", cwd=tmp_path)
    assert call_in_fresh_process(store, "total", [3], cwd=tmp_path) == pytest.approx(float(expected))


def test_unpicklable_global_fails_the_deploy_naming_it_and_publishes_nothing(tmp_path):
    store = tmp_path / "store"
    project = make_project(tmp_path / "p", {"bad.py": """
        import threading
        from framework import deployment
        LOCK = threading.Lock()

        @deployment
        def fine(x):
            return x

        @deployment
        def locked(x):
            with LOCK:
                return x
    """}, ["bad"])
    proc = run_cli("deploy", store=store, cwd=project, check=False)
    assert proc.returncode == 3
    assert "'locked'" in proc.stderr and "'LOCK'" in proc.stderr and "inside the function" in proc.stderr
    assert LocalStore(store).versions("main", "fine") == []


def test_deploy_from_a_main_script_then_run_elsewhere(tmp_path):
    store = tmp_path / "store"
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import framework

        class Model:
            def __init__(self, slope):
                self.slope = slope
            def predict(self, x):
                return self.slope * x

        model = Model(4)

        def score(x: float) -> float:
            return model.predict(x)

        def make_closure(offset):
            local_model = Model(10)
            return lambda x: local_model.predict(x) + offset

        print(framework.deploy(score))
        print(framework.deploy(make_closure(1), name="closure"))
        print(framework.deploy(lambda x: [x, x], name="pair"))
        print(framework.deploy(score))  # unchanged: same version again
    """))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=cli_env(store),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1", "1", "1"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert call_in_fresh_process(store, "score", [2.5], cwd=elsewhere) == 10.0
    assert call_in_fresh_process(store, "closure", [2], cwd=elsewhere) == 21
    assert call_in_fresh_process(store, "pair", ["a"], cwd=elsewhere) == ["a", "a"]


def test_deploy_from_a_notebook_cell(tmp_path):
    store = tmp_path / "store"
    out = run_python("""
        import framework
        weights = {"a": 1.5}
        def cell_fn(k):
            return weights[k] * 2
        v1 = framework.deploy(cell_fn, branch="nb")
        weights["a"] = 2.0
        print(v1, framework.deploy(cell_fn, branch="nb"))
    """, cwd=tmp_path, store=store)
    assert out.split() == ["1", "2"]
    assert call_in_fresh_process(store, "cell_fn", ["a"], branch="nb", ref="1", cwd=tmp_path) == 3.0
    assert call_in_fresh_process(store, "cell_fn", ["a"], branch="nb", cwd=tmp_path) == 4.0


# -- the store ----------------------------------------------------------------------


CONCURRENT_DEPLOY = """
    import sys, time, framework
    k = int(sys.argv[1])
    def contended(x):
        return x + k
    while time.time() < float(sys.argv[2]):  # start together
        time.sleep(0.001)
    print(framework.deploy(contended))
"""


def test_eight_concurrent_deploys_get_eight_consecutive_versions(tmp_path):
    store = tmp_path / "store"
    start = time.time() + 2
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(CONCURRENT_DEPLOY), str(k), str(start)],
                              cwd=tmp_path, env=cli_env(store), stdout=subprocess.PIPE, text=True)
             for k in range(8)]
    versions = sorted(int(p.communicate(timeout=120)[0]) for p in procs)
    assert versions == list(range(1, 9))
    s = LocalStore(store)
    assert s.versions("main", "contended") == versions
    ks = set()
    for v in versions:
        manifest = s.read_manifest("main", "contended", v)
        assert manifest["version"] == v
        ks.add(call_in_fresh_process(store, "contended", [0], ref=str(v), cwd=tmp_path))
    assert ks == set(range(8))  # every deploy's content is there, none lost or duplicated


def test_sigkill_mid_publish_leaves_no_partial_version(tmp_path):
    store = tmp_path / "store"
    code = textwrap.dedent("""
        import numpy as np, framework
        blob = np.random.default_rng(0).bytes(300_000_000)
        def heavy(x):
            return len(blob) + x
        print(framework.deploy(heavy), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(store))
    staging = store / ".staging"
    deadline = time.monotonic() + 60
    while not (staging.exists() and any(staging.iterdir())):
        assert time.monotonic() < deadline and proc.poll() is None, "publish never started"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    s = LocalStore(store)
    for v in s.versions("main", "heavy"):  # whatever got renamed in is whole
        manifest = s.read_manifest("main", "heavy", v)
        assert len(s.read_artifact("main", "heavy", v)) == manifest["size"]
    before = s.versions("main", "heavy")
    out = run_python("import framework\nprint(framework.deploy(lambda x: x, name='heavy'))",
                     cwd=tmp_path, store=store)
    assert int(out) == len(before) + 1


def test_tampered_artifact_and_foreign_python_are_refused_before_unpickling(tmp_path):
    store = tmp_path / "store"
    run_cli("deploy", store=store)
    base = store / "branches" / "main"
    artifact = base / "example_doubler" / "1" / "artifact.pkl"
    artifact.write_bytes(artifact.read_bytes() + b"\0")
    manifest_path = base / "example_adder" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["python"] = "3.9.18"
    manifest_path.write_text(json.dumps(manifest))
    here = ".".join(map(str, sys.version_info[:3]))
    for name, expected in [("example_doubler", "IntegrityError: artifact of example_doubler v1"),
                           ("example_adder", f"built with Python 3.9.18 and cannot be loaded by Python {here}")]:
        code = LOAD_AND_CALL.format(store=str(store), branch="main", name=name, ref="1", args=[1, 2, 3])
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and expected in proc.stderr, proc.stderr


def test_store_from_deploy_yaml_and_the_environment(tmp_path):
    project = make_project(tmp_path / "p", {"m.py": """
        from framework import deployment
        @deployment
        def f(x):
            return x
    """}, ["m"])
    with open(project / "deploy.yaml", "a") as f:
        f.write("store: ./from-yaml\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAMEWORK_")}
    subprocess.run([sys.executable, "-m", "framework", "deploy"], cwd=project, env=env, check=True,
                   capture_output=True)
    assert LocalStore(project / "from-yaml").versions("main", "f") == [1]
    run_cli("deploy", store=tmp_path / "from-env", cwd=project)
    assert LocalStore(tmp_path / "from-env").versions("main", "f") == [1]


def test_python_dash_m_and_console_script_agree(tmp_path):
    out = subprocess.run([Path(sys.executable).parent / "framework", "list"], cwd=REPO,
                         env=cli_env(tmp_path / "empty"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "no deployments" in out.stdout


def test_deploying_a_decorated_function_keeps_its_options(tmp_path):
    store = tmp_path / "store"
    out = run_python("""
        import framework
        from framework.store.local import LocalStore

        @framework.deployment(vectorized=True, max_batch_rows=8, python_packages=["numpy"])
        def vscore(x):
            return [2 * v for v in x]

        print(framework.deploy(vscore, name="renamed"), framework.deploy(vscore))
        s = LocalStore(framework.config.load().store)
        for name in ("renamed", "vscore"):
            o = s.read_manifest("main", name, 1)["options"]
            print(o["vectorized"], o["max_batch_rows"], o["python_packages"])
    """, cwd=tmp_path, store=store)
    assert out.split("\n")[:3] == ["1 1", "True 8 ['numpy']", "True 8 ['numpy']"]


def test_branch_segments_cannot_escape_the_branch_directory(tmp_path):
    store = tmp_path / "store"
    for branch in (".", "a/../b", "./x"):
        proc = run_cli("deploy", "--branch", branch, store=store, check=False)
        assert proc.returncode == 2 and "invalid branch name" in proc.stderr, proc.stderr
    run_cli("deploy", store=store)
    (store / "branches" / "main" / "1").mkdir()  # a stray directory is not a deployment
    assert "example_doubler" in run_cli("list", store=store).stdout


@pytest.mark.parametrize("setting", ["cache_size: 0", "max_concurrency: 0", "timeout_seconds: 0",
                                     "cache_bytes: -1", "port: 0"])
def test_server_settings_below_their_minimum_are_refused(tmp_path, setting):
    (tmp_path / "deploy.yaml").write_text(f"server: {{{setting}}}\n")
    proc = run_cli("serve", store=tmp_path / "s", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and f"server.{setting.split(':')[0]}: must be at least" in proc.stderr


def test_an_edit_within_the_same_second_is_deployed(tmp_path):
    """Python trusts a .pyc whose source has the same mtime second and size: deploy must not."""
    store = tmp_path / "store"
    project = make_project(tmp_path / "p", {}, ["m"])
    for k in range(4):
        (project / "m.py").write_text(f"from framework import deployment\n@deployment\ndef f(x):\n    return x + {k}\n")
        assert " new " in run_cli("deploy", store=store, cwd=project).stdout
    assert [call_in_fresh_process(store, "f", [0], ref=str(v), cwd=tmp_path) for v in (1, 2, 3, 4)] == [0, 1, 2, 3]


def test_a_latest_changed_on_disk_is_replaced_by_the_next_deploy(tmp_path):
    store = tmp_path / "store"
    run_cli("deploy", store=store)
    artifact = store / "branches" / "main" / "example_doubler" / "1" / "artifact.pkl"
    artifact.write_bytes(artifact.read_bytes() + b"\0")
    out = run_cli("deploy", store=store).stdout
    assert [l.split()[3] for l in out.splitlines()[1:] if l.startswith("example_doubler ")] == ["new"]
    assert call_in_fresh_process(store, "example_doubler", [4], cwd=tmp_path) == 8


def test_unknown_deployment_is_named_as_such(tmp_path):
    proc = run_cli("show", "nosuch", "1", store=tmp_path / "store", check=False)
    assert proc.returncode == 5 and "'nosuch' on branch 'main' has no versions" in proc.stderr


def test_serve_on_a_busy_port_says_so(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("serve", "--port", str(port), store=tmp_path / "store", check=False, timeout=30)
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "--port" in proc.stderr
