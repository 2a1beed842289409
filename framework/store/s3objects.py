"""Objects in an S3 bucket under a prefix: conditional reads and writes, and their errors.

`framework.store.s3` builds the store on these few operations. botocore is only
imported when the first request is made (`pip install "framework[s3]"`).
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

from framework.errors import StoreError


class Bucket:
    """`s3://bucket/prefix`: keys given to its methods are relative to the prefix."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = client
        self._client_lock = threading.Lock()
        self._remembered: dict[str, tuple[bytes, str]] = {}  # key -> (body, etag) for 304s
        self._conditional_ok = False

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")
    # -- the S3 client and its errors ---------------------------------------------

    @property
    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError:
                    raise StoreError(
                        f"store {self.url}: S3 stores need boto3; install it with "
                        "pip install \"framework[s3]\""
                    ) from None
                # Short connect timeouts and few retries: a store outage fails a deploy
                # within seconds instead of hanging it, and a poll gives up quickly.
                self._client = boto3.session.Session().client("s3", config=Config(
                    connect_timeout=5, read_timeout=30,
                    retries={"max_attempts": 3, "mode": "standard"},
                ))
            return self._client

    def key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def failed(self, exc: Exception, what: str) -> StoreError:
        code = _code(exc)
        if code == "NoSuchBucket":
            fix = f"create the bucket first (aws s3 mb s3://{self.bucket})"
        elif code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or \
                type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            fix = "check the AWS credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID, an instance role)"
        else:
            fix = "check that the S3 endpoint is up (AWS_ENDPOINT_URL for S3-compatible servers) and retry"
        return StoreError(f"cannot {what} in {self.url}: {exc}; {fix}")

    def get(self, key: str, *, remember: bool = False) -> tuple[bytes, str] | None:
        """(body, etag) of `key`, or None when it does not exist. With `remember`, the
        last answer is kept and the next read is a conditional GET (304: no body sent)."""
        full = self.key(key)
        known = self._remembered.get(full) if remember else None
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if known is not None:
            kwargs["IfNoneMatch"] = known[1]
        try:
            got = self.client.get_object(**kwargs)
            found = (got["Body"].read(), got["ETag"])
        except Exception as exc:  # noqa: BLE001 - botocore's errors, classified below
            code = _code(exc)
            if code in ("304", "NotModified") and known is not None:
                return known
            if code in ("NoSuchKey", "404"):
                self._remembered.pop(full, None)
                return None
            raise self.failed(exc, f"read {key}") from exc
        if remember:
            self._remembered[full] = found
        return found

    def put(self, key: str, data: bytes, *, etag: str | None = None,
             create: bool = False) -> str | None:
        """Write `key`; its new etag, or None when the condition failed."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(key), "Body": data}
        if create:
            kwargs["IfNoneMatch"] = "*"
        if etag is not None:
            kwargs["IfMatch"] = etag
        try:
            return self.client.put_object(**kwargs)["ETag"]
        except Exception as exc:  # noqa: BLE001
            code = _code(exc)
            # 412: the condition failed; 409: another conditional write to the key
            # was in flight; 404: `If-Match` on a key that is gone.
            if (create or etag is not None) and code in (
                "PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404",
            ):
                return None
            raise self.failed(exc, f"write {key}") from exc

    def keys(self, prefix: str, *, delimiter: bool = False) -> list[str]:
        """Keys (or, with `delimiter`, sub-'folders') under `prefix`, relative to it."""
        full = self.key(prefix)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
        if delimiter:
            kwargs["Delimiter"] = "/"
        found: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                if delimiter:
                    found += [p["Prefix"][len(full):].rstrip("/") for p in page.get("CommonPrefixes", [])]
                else:
                    found += [o["Key"][len(full):] for o in page.get("Contents", [])]
        except Exception as exc:  # noqa: BLE001
            raise self.failed(exc, f"list {prefix or 'the store'}") from exc
        return found

    def check_conditional(self) -> None:
        """Refuse a server that ignores conditional writes: two racing deploys there
        would both think they created version N, and one version would be lost."""
        if self._conditional_ok:
            return
        probe = f".probe/{uuid.uuid4().hex}"
        first = self.put(probe, b"1", create=True)
        again = self.put(probe, b"2", create=True)
        stale = self.put(probe, b"3", etag='"00000000000000000000000000000000"')
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(probe))
        except Exception:  # noqa: BLE001 - a leftover probe object is harmless
            pass
        if first is None or again is not None or stale is not None:
            raise StoreError(
                f"the S3 server behind {self.url} ignores conditional writes (If-None-Match: * "
                "and If-Match): concurrent deploys there would lose versions, so publishing is "
                "refused; use a server that honours them (AWS S3, a recent MinIO, moto 5)"
            )
        self._conditional_ok = True

    def remember(self, key: str, data: bytes, etag: str) -> None:
        """What this process just wrote: the next read of `key` can be a 304."""
        self._remembered[self.key(key)] = (data, etag)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(key))
            return True
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self.failed(exc, f"read {key}") from exc

    def delete(self, key: str) -> None:
        """Remove `key`; no error when it is already gone."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(key))
        except Exception as exc:  # noqa: BLE001
            if _code(exc) not in ("NoSuchKey", "404"):
                raise self.failed(exc, f"delete {key}") from exc

    def check_writable(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self.failed(exc, "reach the bucket") from exc
        self.check_conditional()


def _code(exc: Exception) -> str:
    """botocore's error code ("NoSuchKey", "PreconditionFailed", "304"...), or ''."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code", ""))
