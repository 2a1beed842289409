"""The floors: two bare Starlette apps doing the same work as the runtime, nothing more.

Each parses the body with orjson, calls the same function per row, sorts the
rows by id and serializes with orjson, as a hand-written endpoint would.

- `app` (*bare-inline*) calls the function on the event loop: the cheapest
  design, and the unsafe one (a slow or blocking call stalls every request).
- `safe_app` (*bare-safe*) runs the same work with
  `await starlette.concurrency.run_in_threadpool(...)`, Starlette's own way
  to call sync code from an async endpoint.

Usage: python bench/bare_app.py PORT [WORKERS] [--safe]
"""

from __future__ import annotations

import sys
from operator import itemgetter
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from functions import doubler

fn = doubler.fn


def work(data: Any) -> Any:
    if isinstance(data, list) and all(isinstance(row, list) for row in data):
        return sorted(([row[0], fn(*row[1:])] for row in data), key=itemgetter(0))
    return fn(data)


async def infer(request: Request) -> Response:
    out = work(orjson.loads(await request.body())["data"])
    return Response(orjson.dumps({"data": out}), media_type="application/json")


async def infer_safe(request: Request) -> Response:
    out = await run_in_threadpool(work, orjson.loads(await request.body())["data"])
    return Response(orjson.dumps({"data": out}), media_type="application/json")


app = Starlette(routes=[Route("/v1/{name}/{ref}", infer, methods=["POST"])])
safe_app = Starlette(routes=[Route("/v1/{name}/{ref}", infer_safe, methods=["POST"])])

if __name__ == "__main__":
    import uvicorn

    from framework.serve.server import NoDelay

    args = [a for a in sys.argv[1:] if a != "--safe"]
    safe = "--safe" in sys.argv[1:]
    port, workers = int(args[0]), int(args[1]) if len(args) > 1 else 1
    name = "safe_app" if safe else "app"
    target = f"bare_app:{name}" if workers > 1 else (safe_app if safe else app)
    # uvicorn's own protocol with TCP_NODELAY, which `framework serve` sets too: with plain
    # `--workers` any app answers about 40 ms late (see framework/serve/server.py). Not
    # the runtime's writing of a response in one send, which is the framework's own work.
    uvicorn.run(target, host="127.0.0.1", port=port, workers=workers, log_level="warning",
                http=NoDelay)
