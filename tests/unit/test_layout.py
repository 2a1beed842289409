"""The package's layout: dependencies run one way, and artifacts of the flat layout load."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import framework
from framework.build.registry import Deployment, make
from framework.execute.loading import MOVED, unpickle

ROOT = Path(framework.__file__).parent
# What each subpackage may import; the top-level modules (errors, protocol, encoding,
# config, client, cli) are listed as "top".
ALLOWED = {
    "store": {"top"},
    "execute": {"top", "store"},
    "build": {"top", "store", "execute"},
    "serve": {"top", "store", "execute"},
    "batch": {"top", "store", "execute"},
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("framework"):
            if node.module == "framework":
                found |= {f"framework.{a.name}" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("framework")}
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (ROOT / parts[1]).is_dir() else "top"


def test_subpackages_import_only_what_lies_below_them():
    wrong = []
    for pkg, allowed in ALLOWED.items():
        for path in (ROOT / pkg).rglob("*.py"):
            for module in _imports(path):
                target = _package(module)
                if target != pkg and target not in allowed and module != "framework.__version__":
                    wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert wrong == []


def test_a_pickle_naming_a_module_of_the_flat_layout_still_loads():
    dep = make(lambda x: x, name="old")
    # Protocol 2 writes module names as text lines: rename the module as 0.x named it.
    data = pickle.dumps(dep.options, protocol=2)
    new = type(dep.options).__module__.encode()
    assert new == b"framework.build.registry"
    old = data.replace(new + b"\n", b"framework.registry\n")
    assert old != data
    assert unpickle(old) == dep.options
    assert isinstance(Deployment, type) and MOVED["framework.registry"] == "framework.build.registry"


def test_every_moved_module_exists():
    import importlib

    for new in MOVED.values():
        importlib.import_module(new)


def test_environments_put_the_framework_package_itself_on_their_path(tmp_path):
    from framework.execute.environments import FRAMEWORK_DIR, Environments

    assert FRAMEWORK_DIR == ROOT.resolve()
    envs = Environments(tmp_path, [])
    stale = tmp_path / "framework-lib"
    stale.mkdir()
    (stale / "framework").symlink_to(ROOT / "execute")  # a link an earlier install left
    lib = envs._framework_lib()
    assert (lib / "framework").resolve() == FRAMEWORK_DIR
    assert (lib / "framework" / "execute" / "worker.py").exists()
