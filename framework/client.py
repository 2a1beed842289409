"""`get_inference`: the Python client, shaped like `modelbit.get_inference`.

Large batches are split into chunks sent concurrently; the answers are merged
and sorted by id across chunks. Rows are sent with `"partial": true`, so one
failed row costs no other row its answer: failures raise `InferenceError`
carrying both the rows that succeeded and those that failed.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson

from framework.errors import InferenceError
from framework.protocol import pair_order

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = {429, 503}
RETRIES = 3


def _is_batch(data: Any) -> bool:
    return isinstance(data, list) and all(isinstance(row, list) for row in data)


def _seconds(retry_after: str | None) -> float:
    """Retry-After in seconds; an HTTP date (or garbage) counts as one second."""
    try:
        return max(float(retry_after or 1), 0.0)
    except ValueError:
        return 1.0


def _post(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    for attempt in range(RETRIES + 1):
        try:
            resp = client.post(path, content=content, headers={"Content-Type": "application/json"})
        except httpx.TransportError as exc:
            raise InferenceError(
                f"cannot reach {client.base_url} ({type(exc).__name__}: {exc}); is `framework "
                "serve` running there? pass url=... to call another server"
            ) from exc
        if resp.status_code not in RETRY_STATUSES or attempt == RETRIES:
            break
        time.sleep(min(_seconds(resp.headers.get("Retry-After")), 5.0) * (attempt + 1))
    try:
        doc = resp.json()
    except ValueError:
        raise InferenceError(
            f"HTTP {resp.status_code} from {resp.request.url} with a non-JSON body",
            status=resp.status_code,
        ) from None
    if resp.status_code >= 400 or "error" in doc and not body.get("partial"):
        raise InferenceError(
            doc.get("error", f"HTTP {resp.status_code}"),
            status=resp.status_code,
            errors=doc.get("errors"),
        )
    return doc


def get_inference(
    deployment: str,
    data: Any,
    *,
    url: str = DEFAULT_URL,
    branch: str | None = None,
    version: str | int = "latest",
    api_key: str | None = None,
    timeout_seconds: float | None = None,
    batch_size: int = 5000,
    concurrency: int = 4,
    workspace: str | None = None,
    region: str | None = None,
    response_format: str | None = None,
    response_webhook: str | None = None,
    response_webhook_ignore_timeout: bool | None = None,
) -> dict[str, Any]:
    """Call a deployment; returns `{"data": ...}` like the server (and modelbit).

    `workspace` and `region` are accepted so that calls written for
    `modelbit.get_inference` run unchanged; the server is the one at `url`.
    With `response_webhook` the answer is `{"batchId": ...}` and the result is
    POSTed to the webhook; with `response_format="links"` it is `{"data": url}`.
    Either way the data goes in one request, not in chunks: one call has one
    batch id, one link.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    path = f"/v1/{deployment}/{(branch or 'main').replace('/', '~')}/{version}"
    headers = {"Authorization": api_key} if api_key else {}
    extra: dict[str, Any] = {"timeout_seconds": timeout_seconds} if timeout_seconds else {}
    later = {k: v for k, v in (("response_format", response_format),
                               ("response_webhook", response_webhook),
                               ("response_webhook_ignore_timeout", response_webhook_ignore_timeout))
             if v is not None}
    # The server enforces the call's time limit; the HTTP timeout only guards the socket.
    http_timeout = httpx.Timeout(None if timeout_seconds is None else timeout_seconds + 30, connect=10)
    with httpx.Client(base_url=url, headers=headers, timeout=http_timeout) as client:
        if not _is_batch(data):
            return _post(client, path, {"data": data, "batch": False, **extra, **later})
        if later:
            return _post(client, path, {"data": data, **extra, **later})
        # By value, as the server compares them (1 and 1.0 are one id); unhashable ids are
        # left for the server to refuse with the row's index.
        ids = [row[0] for row in data if row and isinstance(row[0], (str, int, float))]
        if len(set(ids)) != len(ids):
            raise InferenceError("ids in a batch must be unique; make every row's first element distinct")
        chunks = [data[i:i + batch_size] for i in range(0, len(data), batch_size)] or [[]]
        with ThreadPoolExecutor(max(1, min(concurrency, len(chunks)))) as pool:
            answers = list(pool.map(
                lambda chunk: _post(client, path, {"data": chunk, "partial": True, **extra}),
                chunks,
            ))
    rows = sorted((r for a in answers for r in a["data"]), key=pair_order)
    errors = sorted((e for a in answers for e in a.get("errors", [])), key=pair_order)
    if errors:
        first_id, first_error = errors[0]
        raise InferenceError(
            f"{len(errors)} of {len(data)} rows failed; first failed id {first_id!r}:\n{first_error}",
            status=200,
            data=rows,
            errors=errors,
        )
    return {"data": rows}
