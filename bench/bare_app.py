"""The floor: a bare Starlette app doing the same work as the runtime, nothing more.

It parses the body with orjson, calls the same function per row, sorts the
rows by id and serializes with orjson, as a hand-written endpoint would.
Usage: python bench/bare_app.py PORT [WORKERS]
"""

from __future__ import annotations

import sys
from operator import itemgetter

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from functions import doubler

fn = doubler.fn


async def infer(request: Request) -> Response:
    data = orjson.loads(await request.body())["data"]
    if isinstance(data, list) and all(isinstance(row, list) for row in data):
        out = sorted(([row[0], fn(*row[1:])] for row in data), key=itemgetter(0))
    else:
        out = fn(data)
    return Response(orjson.dumps({"data": out}), media_type="application/json")


app = Starlette(routes=[Route("/v1/{name}/{ref}", infer, methods=["POST"])])

if __name__ == "__main__":
    import uvicorn

    from framework.server import HTTPProtocol

    port, workers = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1
    target = "bare_app:app" if workers > 1 else app
    # uvicorn's protocol with TCP_NODELAY, as `framework serve` runs: with plain
    # `--workers` any app answers about 40 ms late (see framework/server.py).
    uvicorn.run(target, host="127.0.0.1", port=port, workers=workers, log_level="warning",
                http=HTTPProtocol)
