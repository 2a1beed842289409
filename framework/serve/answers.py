"""Where errors become HTTP answers: `STATUS` is the one table of exception to status.

Every error body is JSON `{"error": "..."}` saying what was wrong and what to do.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import Response
from starlette.types import Scope, Send

from framework import encoding
from framework.serve.scope import SCOPE_ERROR
from framework.errors import (
    BadRequest,
    BodyTimeout,
    CallTimeout,
    ConfigError,
    DeploymentFailed,
    EnvironmentBuilding,
    EnvironmentFailed,
    FrameworkError,
    Forbidden,
    Gone,
    IncompatibleArtifact,
    IntegrityError,
    LoadFailed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RowsFailed,
    StoreDamaged,
    StoreError,
    Unauthorized,
)

log = logging.getLogger("framework.runtime")

# Nothing a retry cannot fix is a 5xx: the modelbit client retries those.
# An error not listed here reaching a caller is a bug: it is answered as a crash (500).
STATUS: dict[type[FrameworkError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    BodyTimeout: 408,
    IntegrityError: 409,
    IncompatibleArtifact: 409,
    Gone: 410,  # an expired result link
    StoreDamaged: 409,  # a retry reads the same damaged file: it needs a deploy or a fix
    PayloadTooLarge: 413,
    EnvironmentFailed: 424,  # before LoadFailed, its base class: the first match wins
    DeploymentFailed: 422,
    RowsFailed: 422,
    LoadFailed: 422,
    ConfigError: 500,
    Overloaded: 503,
    EnvironmentBuilding: 503,
    StoreError: 503,  # the store could not be read: a retry may well succeed
    CallTimeout: 504,
}


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else encoding.dumps(content)


def error_response(exc: FrameworkError) -> Response:
    status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), None)
    if status is None:
        log.error("unmapped %s reached a caller", type(exc).__name__, exc_info=exc)
        status = 500
    body: dict[str, Any] = {"error": str(exc).rstrip("\n")}
    if isinstance(exc, RowsFailed):
        body["errors"] = exc.errors
    headers = {"Retry-After": "1"} if status == 503 else (
        {"WWW-Authenticate": "Bearer"} if status == 401 else None)
    if status == 408:  # the rest of a stalled body is not waited for: the connection goes
        headers = {"Connection": "close"}
    return JSONResponse(body, status, headers=headers)


def answer_of(exc: BaseException) -> tuple[int, bytes]:
    """(status, body) of a call that raised `exc` outside a request (an async job)."""
    if isinstance(exc, FrameworkError):
        response = error_response(exc)
    else:
        log.error("unhandled error in an async job", exc_info=exc)
        response = JSONResponse({"error": f"internal error: {type(exc).__name__}"}, 500)
    return response.status_code, bytes(response.body)


async def send_json(send: Send, status: int, payload: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-length", b"%d" % len(payload)), (b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": payload})


def answer_error(scope: Scope, exc: FrameworkError) -> Response:
    """The answer to `exc`, noted in the scope for the metrics and the access log."""
    scope[SCOPE_ERROR] = exc
    return error_response(exc)
