"""The versioned store: `open_store(location)` gives the backend a location names.

`base.Store` is the interface; `local.LocalStore` and `s3.S3Store` the backends;
`names` what may be stored under which name; `signing` and `manifest` what a
version is stored with.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from framework.errors import StoreError
from framework.store.base import Store

__all__ = ["Store", "open_store"]


def open_store(location: str) -> Store:
    """The store named by a `store:` setting or FRAMEWORK_STORE."""
    if location.startswith("s3://"):
        # By name at run time: framework.store.s3 subclasses Store, and only S3 users need it.
        return importlib.import_module("framework.store.s3").S3Store.from_url(location)
    if "://" in location and not location.startswith("file://"):
        raise StoreError(
            f"store {location!r}: use a local directory (or file://path) or s3://bucket/prefix"
        )
    root = Path(location.removeprefix("file://"))
    if root.exists() and not root.is_dir():
        raise StoreError(
            f"the store {root} is a file, not a directory; point FRAMEWORK_STORE or `store:` in "
            "deploy.yaml at a directory"
        )
    from framework.store.local import LocalStore

    return LocalStore(root)
