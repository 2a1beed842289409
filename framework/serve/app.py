"""The Starlette app: routes, middleware, the error handlers and the lifespan.

`framework.serve.runtime` holds the request path; `framework.serve.answers`
turns errors into answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from framework import config as cfgmod
from framework.errors import FrameworkError
from framework.serve import auth, observe, openapi
from framework.serve.accesslog import AccessLog
from framework.serve.answers import JSONResponse, answer_error, error_response
from framework.serve.metrics import Metrics
from framework.serve.refresh import Refresher
from framework.serve.runtime import Runtime
from framework.serve.scope import SCOPE_ERROR
from framework.store import signing

log = logging.getLogger("framework.runtime")
MATCHES_KEPT = 1024  # paths whose route InferenceFirst keeps


class InferenceFirst:
    """Answers the inference routes ahead of Starlette's ExceptionMiddleware and router.

    Those build a `Request` and two closures for every request they pass on,
    a noticeable share of a one-row request's cost. Here a
    FrameworkError becomes its answer through a try block, which costs nothing
    until something raises. Other requests go on to them; so does anything
    else the routes raise, as it would have.
    """

    def __init__(self, app: ASGIApp, routes: list[Route]) -> None:
        self.app = app
        self.routes = routes
        # Path (and root path) to the route it matches and the scope it adds, or None:
        # clients repeat a few paths, and matching one runs a regular expression and builds
        # two dictionaries.
        self.matched: dict[tuple[str, str], tuple[ASGIApp, Scope] | None] = {}

    def _match(self, scope: Scope) -> tuple[ASGIApp, Scope] | None:
        for route in self.routes:
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                return route.app, child_scope
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            if "path_params" in scope:  # a mount's: they join the match, so it is not kept
                found = self._match(scope)
            else:
                key = (scope["path"], scope.get("root_path", ""))
                try:
                    found = self.matched[key]
                except KeyError:
                    if len(self.matched) >= MATCHES_KEPT:  # random paths cannot grow it for ever
                        self.matched.clear()
                    found = self.matched[key] = self._match(scope)
            if found is not None:
                app, child_scope = found
                # Each request its own params: the kept ones are every later request's too.
                scope.update(child_scope, path_params=dict(child_scope["path_params"]))
                try:
                    await app(scope, receive, send)
                except FrameworkError as exc:
                    await answer_error(scope, exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ASGIEndpoint:
    """Routes `app` as the ASGI app it is: Starlette takes a function or a method
    for an endpoint that gets a `Request`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def create_app(cfg: cfgmod.Config | None = None) -> Starlette:
    signing.current_key()  # a bad $FRAMEWORK_SIGNING_KEY stops the start, not every call
    rt = Runtime(cfg or cfgmod.load())
    s = rt.cfg.server
    debug = bool(s["debug"])
    metrics = Metrics(rt) if s["metrics"] else None
    if metrics is not None:
        metrics.registry.register(rt.jobs)
    # Outermost first: the observer also sees (and logs) the answers of the key check.
    ring = auth.KeyRing(rt.store, required=s["require_api_keys"])
    refresher = Refresher(rt.versions, ring)
    middleware = [Middleware(auth.AuthMiddleware, ring=ring, on_error=error_response)]
    access = AccessLog() if s["access_log"] else None
    observer = None
    if metrics is not None or access is not None:
        observer = observe.Observer(metrics, access, s["log_payloads"])
        middleware.insert(0, Middleware(observe.ObserveMiddleware, observer=observer))

    async def on_framework_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, FrameworkError)
        return answer_error(request.scope, exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        request.scope[SCOPE_ERROR] = exc
        hint = {404: f"no route {request.url.path}; POST /v1/<name>/<ref> or /v1/<name>/<branch>/<ref> "
                     "to run a deployment (write '/' in a branch as '~')",
                405: f"{request.method} is not allowed on {request.url.path}"}
        headers = exc.headers
        if exc.status_code == 405:  # Starlette names the first matching route's methods only
            allowed = {m for r in routes if r.matches(request.scope)[0] != Match.NONE
                       for m in getattr(r, "methods", None) or ()}
            headers = {"Allow": ", ".join(sorted(allowed))}
        return JSONResponse({"error": hint.get(exc.status_code, exc.detail)}, exc.status_code,
                            headers=headers)

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        detail = "".join(traceback.format_exception(exc)) if debug else ""
        return JSONResponse({"error": f"{detail}internal error: {type(exc).__name__}"}, 500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        building = None
        if s["prebuild"] or s["preload"]:
            rt.not_ready = ("building the environments of latest and aliased versions "
                            "(server.prebuild)" if s["prebuild"] else
                            "loading latest and aliased versions (server.preload)")
            building = asyncio.ensure_future(rt.start_up(s["prebuild"], s["preload"]))
        refresher.start()  # refs and keys stay fresh whatever the traffic
        rt.jobs.start()
        yield
        await rt.jobs.stop()
        await refresher.stop()
        if building is not None:
            building.cancel()
        rt.versions.close()
        if observer is not None:
            observer.flush()

    # Inference first: routes are tried in order, and a GET on the same path still finds
    # its own route further down. InferenceFirst answers them; the router's copies
    # name POST in a 405's Allow header.
    infer = ASGIEndpoint(rt.infer)
    inference = [Route("/v1/{name}/{ref}", infer, methods=["POST"]),
                 Route("/v1/{name}/{branch}/{ref}", infer, methods=["POST"])]
    middleware.append(Middleware(InferenceFirst, routes=inference))
    routes = [
        *inference,
        Route("/healthz", rt.healthz, methods=["GET"]),
        Route("/v1", rt.list_deployments, methods=["GET"]),
        Route("/v1/", rt.list_deployments, methods=["GET"]),
        Route("/v1/batches/{batch_id}", rt.batch, methods=["GET"]),
        Route("/v1/{name}/links/{link_id}", rt.link, methods=["GET"]),
        Route("/v1/{name}", rt.describe, methods=["GET"]),
        Route("/v1/{name}/{branch}", rt.describe, methods=["GET"]),
        Route("/openapi.json", openapi.endpoint(rt), methods=["GET"]),
        *observe.routes(rt, metrics, observer),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            FrameworkError: on_framework_error,
            HTTPException: on_http_error,
            Exception: on_crash,
        },
        lifespan=lifespan,
    )
    # A trailing slash gets a JSON 404, not a bodyless redirect that POST clients mishandle.
    app.router.redirect_slashes = False
    app.state.runtime = rt
    app.state.refresher = refresher
    return app


def serving_app(cfg: cfgmod.Config) -> Starlette:
    """The app of a `framework serve` process, whose garbage collector it tunes once built."""
    from framework.serve.server import tune_gc

    app = create_app(cfg)
    tune_gc()
    return app


def app_from_env() -> Starlette:
    """uvicorn factory for `framework serve --workers N`: config from $FRAMEWORK_CONFIG."""
    return serving_app(cfgmod.load())
