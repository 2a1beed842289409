"""Per-deployment environments: the server never needs a deployment's packages.

A version's declared `python_packages` plus its detected requirements (the
exact versions it was deployed with) name an environment: a hash of the
Python major.minor and the sorted requirements. Where the server's own
environment satisfies them and runs the same Python, the version runs in
the server as usual. Otherwise `Environments.ensure` builds that
environment once (with uv; with venv and pip where uv is missing) under
`server.env_dir`, and the version runs in worker processes started from its
interpreter (`framework.execute.isolation`). Every version with the same set shares
it.

A build is staged in a directory of its own and renamed into place, under a
file lock, so two processes building the same environment neither corrupt it
nor build it twice. A failed build keeps its log and is remembered for
`FAILED_TTL_S`, so a bad requirement is not reinstalled on every call.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from framework.errors import EnvironmentFailed, IncompatibleArtifact

FAILED_TTL_S = 300.0
BUILD_TIMEOUT_S = 900.0
HERE = ".".join(map(str, sys.version_info[:2]))
# The framework's own package, put on the environment's path by a .pth file: the worker
# needs it, cloudpickle and orjson, nothing else of the server's.
FRAMEWORK_DIR = Path(__file__).resolve().parents[1]
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def default_dir() -> Path:
    cache = os.environ.get("FRAMEWORK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "framework")
    return Path(cache) / "envs"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(manifest: dict[str, Any]) -> list[str]:
    """What the version needs: declared requirements, and the detected ones not declared."""
    reqs = manifest.get("requirements") or {}
    declared = [str(r).strip() for r in reqs.get("declared") or ()]
    named = {_canonical(m.group(1)) for r in declared if (m := _NAME.match(r))}
    # The framework itself is not a requirement: the worker gets this server's copy.
    named.add("framework")
    detected = [f"{dist}=={version}" for dist, version in (reqs.get("detected") or {}).items()
                if _canonical(dist) not in named]
    return sorted(set(declared + detected))


def python_of(manifest: dict[str, Any]) -> str:
    return ".".join(str(manifest.get("python", HERE)).split(".")[:2])


def satisfied_here(reqs: list[str]) -> bool:
    """Whether this interpreter's installed packages meet every requirement."""
    from packaging.requirements import InvalidRequirement, Requirement

    for text in reqs:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            return False  # the installer will name what is wrong with it
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            return False
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            return False
    return True


def env_key(reqs: list[str], python: str) -> str:
    return hashlib.sha256(json.dumps([python, reqs]).encode()).hexdigest()[:16]


_uv_lock = threading.Lock()


@functools.cache
def _uv_bin() -> str | None:
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def _uv() -> str | None:
    # Once, under a lock: uv's finder reads sysconfig, whose first read is not thread-safe.
    with _uv_lock:
        return _uv_bin()


class Environments:
    """Where environments are built, found and reused."""

    def __init__(self, root: str | os.PathLike[str] | None = None,
                 pythons: list[str] | None = None) -> None:
        self.root = Path(root) if root else default_dir()
        self.pythons = list(pythons or [])

    def needs(self, manifest: dict[str, Any]) -> bool:
        """Whether the version must run from an environment of its own."""
        return python_of(manifest) != HERE or not satisfied_here(requirements(manifest))

    def needs_build(self, manifest: dict[str, Any]) -> bool:
        """Whether loading the version would first build its environment."""
        return self.needs(manifest) and self.built(manifest) is None

    def key(self, manifest: dict[str, Any]) -> str:
        return env_key(requirements(manifest), python_of(manifest))

    def interpreter(self, key: str) -> Path:
        return self.root / key / "bin" / "python"

    def built(self, manifest: dict[str, Any]) -> Path | None:
        python = self.interpreter(self.key(manifest))
        return python if python.exists() else None

    def ensure(self, manifest: dict[str, Any], *, rebuild_failed: bool = False) -> Path:
        """The interpreter of the version's environment, built first if need be."""
        key = self.key(manifest)
        python = self.interpreter(key)
        if python.exists():
            self._framework_lib()  # built by another framework install, maybe: this one runs it
            return python
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build per environment, across processes
            if python.exists():  # built by another process while this one waited
                return python
            failed = self.root / f"{key}.failed"
            if failed.exists() and not rebuild_failed:
                record = json.loads(failed.read_text())
                if time.time() - record["at"] < FAILED_TTL_S:
                    raise EnvironmentFailed(record["error"])
            failed.unlink(missing_ok=True)
            self._build(key, requirements(manifest), self.base_python(python_of(manifest), manifest))
        return python

    def base_python(self, version: str, manifest: dict[str, Any]) -> str:
        """An interpreter of Python `version` on this machine: this one, `server.pythons`,
        or one uv finds; else the version is refused as before, both versions named."""
        if version == HERE:
            return sys.executable
        for candidate in self.pythons:
            if _version_of(candidate) == version:
                return candidate
        uv = _uv()
        if uv is not None:
            found = subprocess.run([uv, "python", "find", "--no-python-downloads", version],
                                   capture_output=True, text=True, timeout=60)
            if found.returncode == 0 and found.stdout.strip():
                return found.stdout.strip()
        raise IncompatibleArtifact(
            f"{manifest.get('name')} v{manifest.get('version')} was built with Python "
            f"{manifest.get('python')} and this server runs Python {HERE}, with no Python "
            f"{version} installed: install one (and list it in server.pythons), or redeploy "
            f"from Python {HERE}")

    def _build(self, key: str, reqs: list[str], base: str) -> None:
        stage = self.root / f".stage-{key}-{uuid.uuid4().hex[:8]}"
        log_path = self.root / f"{key}.log"
        import cloudpickle  # the artifact's pickler, in the same version where it loads

        extras = [f"cloudpickle=={cloudpickle.__version__}", "orjson>=3.9"]
        uv = _uv()
        if uv is not None:
            steps = [[uv, "venv", "--quiet", "--python", base, str(stage)],
                     [uv, "pip", "install", "--python", str(stage / "bin" / "python"), *extras, *reqs]]
        else:
            steps = [[base, "-m", "venv", str(stage)],
                     [str(stage / "bin" / "python"), "-m", "pip", "install", "-q", *extras, *reqs]]
        # uv trusts the system's certificate store, as pip does: behind a proxy with a
        # company CA it would otherwise refuse the package index.
        env = {"UV_SYSTEM_CERTS": "1", "UV_NATIVE_TLS": "1", **os.environ}
        try:
            with open(log_path, "w") as log:
                log.write(f"requirements: {reqs}\nbase: {base}\n")
                for step in steps:
                    log.write(f"$ {' '.join(step)}\n")
                    log.flush()
                    proc = subprocess.run(step, stdout=log, stderr=subprocess.STDOUT, text=True,
                                          timeout=BUILD_TIMEOUT_S, env=env)
                    if proc.returncode != 0:
                        raise EnvironmentFailed(self._failure(key, reqs, log_path))
            site = subprocess.run([str(stage / "bin" / "python"), "-c",
                                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True, timeout=60).stdout.strip()
            Path(site, "_framework.pth").write_text(f"{self._framework_lib()}\n")
            os.rename(stage, self.root / key)
        except subprocess.TimeoutExpired as exc:
            raise EnvironmentFailed(self._record(key, f"building the environment for {reqs} took "
                                                 f"over {exc.timeout:g} s; see {log_path}")) from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _framework_lib(self) -> Path:
        """A directory holding only a link to this framework package, for environments' paths.

        The link is checked each time: a framework installed elsewhere since (an upgrade,
        a moved checkout) gets it pointed at itself, atomically, by a rename."""
        link = self.root / "framework-lib"
        link.mkdir(parents=True, exist_ok=True)
        target = link / "framework"
        if not target.is_symlink() or target.resolve() != FRAMEWORK_DIR:
            tmp = link / f".framework-{uuid.uuid4().hex[:8]}"
            tmp.symlink_to(FRAMEWORK_DIR)
            os.replace(tmp, target)
        return link

    def _failure(self, key: str, reqs: list[str], log_path: Path) -> str:
        lines = [line.strip(" ×╰─▶│") for line in log_path.read_text().splitlines()]
        last = next((line for line in reversed(lines) if line.strip()), "no output")
        return self._record(key, f"cannot build the environment for {', '.join(reqs) or 'no packages'}: "
                                 f"{last.strip()}; fix python_packages and redeploy (build log: {log_path})")

    def _record(self, key: str, message: str) -> str:
        (self.root / f"{key}.failed").write_text(json.dumps({"error": message, "at": time.time()}))
        return message


def _version_of(python: str) -> str | None:
    try:
        out = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def wanted(store: Any, *, every_version: bool = False,
           names: list[str] | None = None) -> list[dict[str, Any]]:
    """The manifests whose environments a server will need: `latest` and aliased versions
    of every deployment (or of `names`), or every version."""
    found = []
    for branch, name, latest in store.deployments():
        if names and name not in names:
            continue
        numbers = store.versions(branch, name) if every_version else sorted(
            {latest, *store.aliases(branch, name).values()})
        found += [store.read_manifest(branch, name, v) for v in numbers]
    return found


def build_all(envs: Environments, manifests: list[dict[str, Any]], *,
              rebuild_failed: bool = False, report: Any = None) -> list[tuple[dict[str, Any], str]]:
    """Build what `manifests` need; (manifest, outcome) for each: "here" (the server's own
    environment does), "built", "reused", or the error's message."""
    out = []
    for m in manifests:
        if not envs.needs(m):
            outcome = "here"
        elif envs.built(m) is not None:
            outcome = "reused"
        else:
            try:
                envs.ensure(m, rebuild_failed=rebuild_failed)
                outcome = "built"
            except (EnvironmentFailed, IncompatibleArtifact) as exc:
                outcome = str(exc)
        if report is not None:
            report(m, outcome)
        out.append((m, outcome))
    return out
