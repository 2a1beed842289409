"""What a deployment, branch, alias or document key may be called: the store holds them all."""

from __future__ import annotations

import re
from urllib.parse import quote

from framework.errors import NotFound, RegistryError, StoreError

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,99}$")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistryError(
            f"invalid deployment name {name!r}: use letters, digits, '_' or '-', "
            "starting with a letter or '_' (at most 100 characters)"
        )
    return name


BRANCH_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
# A branch is one directory name once '/' is %-encoded (3 bytes): file systems allow 255.
MAX_BRANCH_CHARS = 200


def check_branch(branch: object) -> str:
    # A "." or ".." segment would name a directory other than the branch's own.
    if not isinstance(branch, str) or not BRANCH_RE.match(branch) or any(
        part in (".", "..") for part in branch.split("/")
    ) or len(quote(branch, safe="")) > MAX_BRANCH_CHARS:
        shown = branch if not isinstance(branch, str) or len(branch) <= 80 else branch[:80] + "..."
        raise NotFound(
            f"invalid branch name {shown!r}: use letters, digits, '.', '_', '-' and '/', with no "
            f"'.' or '..' segment, at most {MAX_BRANCH_CHARS} characters ('/' counts 3; write "
            "'/' as '~' in URLs)"
        )
    return branch


def check_alias(alias: object) -> str:
    if not isinstance(alias, str) or alias == "latest" or not ALIAS_RE.match(alias):
        raise StoreError(
            f"invalid alias {alias!r}: an alias starts with a letter or '_', uses letters, digits, "
            "'_', '.' or '-', and cannot be 'latest' or a number"
        )
    return alias


DOC_KEY_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


def check_doc_key(key: object) -> str:
    if not isinstance(key, str) or not DOC_KEY_RE.match(key) or any(
        part in (".", "..") for part in key.split("/")
    ):
        raise StoreError(f"invalid document key {key!r}: use '/'-separated [A-Za-z0-9._-] segments")
    return key
