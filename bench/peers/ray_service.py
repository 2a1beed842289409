"""The doubler on Ray Serve 2, speaking the same protocol as the bare app.

    serve run ray_service:app --route-prefix /v1/doubler/latest    (from this directory;
    Ray Serve listens on port 8000 unless RAY_SERVE_HTTP_PORT says otherwise)
"""

from __future__ import annotations

from typing import Any

from ray import serve
from starlette.requests import Request


def doubler(foo: int) -> int:
    return 2 * foo


@serve.deployment(num_replicas=1)
class Doubler:
    async def __call__(self, request: Request) -> dict[str, Any]:
        data = (await request.json())["data"]
        if isinstance(data, list) and all(isinstance(row, list) for row in data):
            return {"data": sorted(([row[0], doubler(*row[1:])] for row in data), key=lambda r: r[0])}
        return {"data": doubler(data)}


app = Doubler.bind()
