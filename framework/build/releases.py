"""What CI does around a deploy: target branches, pinned aliases, promotion and rollback.

Promotion and rollback never rebuild. They republish a stored version's
artifact bytes unchanged (same sha256, same content fingerprint) as the next
version of a branch, so history stays append-only, the runtime needs no
special case, and the new manifest says where the bytes came from
(`promoted_from` / `rolled_back_from`: branch, version, sha256). With a
signing key set, the source's signature is verified and the copy re-signed.
"""

from __future__ import annotations

from typing import Any

from framework import config as cfgmod
from framework.store import manifest as mf
from framework.store import signing
from framework.errors import ConfigError, NotFound, StoreError
from framework.build.publish import Result, publish_changed
from framework.store.base import Store
from framework.store.names import check_alias, check_branch

ORIGINS = ("promoted_from", "rolled_back_from")


def deploy_branch(cli_branch: str | None, cfg: cfgmod.Config) -> str:
    """The branch a deploy targets, refused as bad configuration when it is not a valid name."""
    branch = cli_branch or cfg.branch
    try:
        return check_branch(branch)
    except NotFound as exc:
        source = "--branch" if cli_branch else f"{cfg.path or cfgmod.CONFIG_NAME}: branch"
        raise ConfigError(f"{source}: {exc}") from None


def alias_name(alias: str) -> str:
    """`alias` when it is a valid alias name; a usage error (not a store error) otherwise."""
    try:
        return check_alias(alias)
    except StoreError as exc:
        raise ConfigError(str(exc)) from None


# -- aliases pinned in deploy.yaml -------------------------------------------


def pins_for(cfg: cfgmod.Config, branch: str) -> dict[str, dict[str, int]]:
    """The `aliases:` of deploy.yaml that apply to a deploy into `branch`.

    Pins describe the branch deploy.yaml deploys to (`branch:`, default main).
    A deploy elsewhere, such as a pull request's preview, has its own version
    numbers, so the pins would point at unrelated versions: they are left out.
    """
    return cfg.aliases if branch == cfg.branch else {}


def check_pins(cfg: cfgmod.Config, store: Store, branch: str, deploying: list[str],
               changed: list[str]) -> None:
    """Refuse pins to versions that neither exist nor are about to be published.

    `deploying` are the names this deploy packs, `changed` those of them that
    will get a new version (the next number).
    """
    where = cfg.path or cfgmod.CONFIG_NAME
    for name, pins in pins_for(cfg, branch).items():
        versions = store.versions(branch, name) if name in store.names(branch) else []
        if not versions and name not in deploying:
            raise ConfigError(
                f"{where}: aliases.{name}: no deployment {name!r} on branch {branch!r} and none "
                f"in modules {cfg.modules}; fix the name or remove the entry"
            )
        upcoming = (versions[-1] if versions else 0) + 1 if name in changed else None
        for alias, version in pins.items():
            if version not in versions and version != upcoming:
                have = ", ".join(map(str, versions)) or "none"
                raise ConfigError(
                    f"{where}: aliases.{name}.{alias}: version {version} of {name!r} does not exist "
                    f"on branch {branch!r} (versions: {have}; this deploy "
                    f"{f'would publish {upcoming}' if upcoming else 'publishes none'}); "
                    "point it at an existing version or remove it"
                )


def apply_pins(cfg: cfgmod.Config, store: Store, branch: str) -> list[tuple[str, str, int]]:
    """Move every pinned alias that is not already where deploy.yaml says; returns the moves."""
    moved = []
    for name, pins in pins_for(cfg, branch).items():
        current = store.aliases(branch, name)
        for alias, version in pins.items():
            if current.get(alias) != version:
                store.set_alias(branch, name, alias, version)
                moved.append((name, alias, version))
    return moved


def url_of(cfg: cfgmod.Config, result: Result) -> str | None:
    """Where a published version answers, on the server configured in deploy.yaml."""
    if result.version is None:
        return None
    host, port = cfg.server["host"], cfg.server["port"]
    # A wildcard bind address is not something a caller can connect to.
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    branch = result.branch.replace("/", "~")
    return f"http://{host}:{port}/v1/{result.name}/{branch}/{result.version}"


# -- promote and rollback -----------------------------------------------------


def _republish(store: Store, name: str, src_branch: str, version: int, dst_branch: str,
               origin: str, status: str) -> Result:
    manifest = store.read_manifest(src_branch, name, version)
    artifact = store.read_artifact(src_branch, name, version)
    # Refuse to spread a changed artifact: the copy would get a fresh, trusted-looking version.
    key = signing.current_key()
    signing.check_integrity(artifact, manifest, key)
    # The copy's branch, version, time and origin differ, so the source's signature cannot
    # carry over: the store signs the copy at publish (verified above: only what this key
    # signed is signed again).
    copy: dict[str, Any] = {k: v for k, v in manifest.items() if k not in (*ORIGINS, "signed")}
    copy.update(branch=dst_branch, created_at=mf.now(),
                **{origin: {"branch": src_branch, "version": version, "sha256": manifest["sha256"]}})
    new, fresh = publish_changed(store, dst_branch, name, artifact, copy)
    return Result(name, dst_branch, new, status if fresh else "unchanged", len(artifact),
                  manifest["sha256"])


def promote(store: Store, name: str, *, src: str, dst: str, ref: str = "latest") -> Result:
    """Republish `ref` of `src` as the next version of `dst` (unchanged if `dst` already runs it)."""
    check_branch(dst)
    if src == dst:
        raise ConfigError(f"promote {name}: --from and --to are both {src!r}; name two branches")
    version = store.resolve(check_branch(src), name, ref)
    return _republish(store, name, src, version, dst, "promoted_from", "promoted")


def _previous(store: Store, branch: str, name: str, versions: list[int]) -> int:
    """The version a plain `rollback` goes back to.

    The newest version older than the one `latest` came from whose content
    differs from `latest`: repeated rollbacks keep walking back in history
    instead of undoing each other.
    """
    current = store.read_manifest(branch, name, versions[-1])
    came_from = current.get("rolled_back_from") or {}
    base = came_from.get("version", versions[-1])
    for v in reversed([v for v in versions if v < base]):
        if store.read_manifest(branch, name, v).get("content_sha256") != current["content_sha256"]:
            return v
    raise NotFound(
        f"{name} on branch {branch!r}: no version before v{base} runs other content, nothing to "
        f"roll back to; see `framework versions {name}` and use --to VERSION"
    )


def rollback(store: Store, name: str, *, branch: str, to: str | None = None) -> Result:
    """Republish an older version (default: the one before latest) as the new latest."""
    versions = store.versions(check_branch(branch), name)
    if not versions:
        raise NotFound(f"no deployment {name!r} on branch {branch!r}; see `framework list`")
    target = (_previous(store, branch, name, versions) if to is None
              else store.resolve(branch, name, to))
    return _republish(store, name, branch, target, branch, "rolled_back_from", "rolled-back")


def origin_of(manifest: dict[str, Any]) -> str | None:
    """A short note on where a promoted or rolled-back version's artifact came from."""
    if manifest.get("rolled_back_from"):
        return f"rollback to v{manifest['rolled_back_from']['version']}"
    if manifest.get("promoted_from"):
        src = manifest["promoted_from"]
        return f"promoted from {src['branch']} v{src['version']}"
    return None
