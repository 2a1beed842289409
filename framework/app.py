"""The Starlette runtime: routes, the request path, and the error table.

`STATUS` is the one place where exceptions become HTTP status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from framework import config as cfgmod
from framework import auth, bigbody, encoding, intake, observe, openapi, protocol, signing
from framework.accesslog import AccessLog
from framework.cache import VersionCache
from framework.environments import Environments, build_all, wanted
from framework.jobs import Jobs, is_batch_id
from framework.links import Links
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
from framework.metrics import Metrics
from framework.refresh import Refresher

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
    scope[observe.SCOPE_ERROR] = exc
    return error_response(exc)


class InferenceFirst:
    """Answers the inference routes ahead of Starlette's ExceptionMiddleware and router.

    Those build a `Request` and two closures for every request they pass on,
    about 14,000 instructions, a tenth of a one-row request's. Here a
    FrameworkError becomes its answer through a try block, which costs nothing
    until something raises. Other requests go on to them; so does anything
    else the routes raise, as it would have.
    """

    def __init__(self, app: ASGIApp, routes: list[Route]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for route in self.routes:
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child_scope)
                    try:
                        await route.app(scope, receive, send)
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


class Runtime:
    """The state behind the routes: the store, its cache and the limits."""

    def __init__(self, cfg: cfgmod.Config) -> None:
        self.cfg = cfg
        self.store = cfg.open_store()
        s = cfg.server
        self.limit = s["max_body_bytes"]
        self.body_deadlines = intake.BodyDeadlines(float(s["body_timeout_seconds"]))
        self.max_rows = s["max_rows"]
        self.timeout = float(s["timeout_seconds"])
        self.max_inflight = s["max_concurrency"]
        self.inflight = 0
        self.environments = Environments(s["env_dir"] or None, s["pythons"])
        self.versions = VersionCache(self.store, size=s["cache_size"], max_bytes=s["cache_bytes"],
                                     isolation=s["isolation"], environments=self.environments)
        # Why /readyz should not say ready yet, if anything (server.prebuild building).
        self.not_ready: str | None = None
        self.links = Links(self.store, ttl=float(s["link_ttl_seconds"]), base_url=s["link_base_url"])
        self.jobs = Jobs(self.store, s, self.versions, self.links, answer_of)

    async def start_up(self, prebuild: bool, preload: bool) -> None:
        """What runs before /readyz says ready: environments built (server.prebuild),
        then `latest` and aliased versions loaded (server.preload)."""
        try:
            if prebuild:
                await asyncio.to_thread(self._prebuild)
            if preload:
                await self.preload()
        except FrameworkError as exc:
            log.error("getting ready failed, serving anyway: %s", exc)
        finally:
            self.not_ready = None

    def _prebuild(self) -> None:
        for m, outcome in build_all(self.environments, wanted(self.store)):
            if outcome not in ("here", "built", "reused"):
                log.error("%s v%s: %s", m["name"], m["version"], outcome)

    def _named_refs(self) -> list[tuple[str, str, str]]:
        found = []
        for branch, name, _ in self.store.deployments():
            found.append((branch, name, "latest"))
            found += [(branch, name, alias) for alias in self.store.aliases(branch, name)]
        return found

    async def preload(self) -> None:
        """Load the versions `latest` and aliases name (at most cache_size of them, and not
        those whose environment is not built), so no first caller pays a load."""
        keys: list[tuple[str, str, int]] = []
        for branch, name, ref in await asyncio.to_thread(self._named_refs):
            try:
                key = (branch, name, await self.versions.resolve(branch, name, ref))
            except FrameworkError:
                continue  # moved or damaged meanwhile: its callers get the answer
            if key not in keys:
                keys.append(key)

        async def load(key: tuple[str, str, int]) -> None:
            try:
                manifest = await asyncio.to_thread(self.store.read_manifest, *key)
                if not await asyncio.to_thread(self.environments.needs_build, manifest):
                    await self.versions.runner(*key, self.timeout)
            except FrameworkError as exc:
                log.warning("%s v%d (%s) was not loaded ahead: %s", key[1], key[2], key[0], exc)

        await asyncio.gather(*map(load, keys[: self.versions.size]))

    async def infer(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/<name>/<ref>: an ASGI app, not a Starlette endpoint. The request
        and response objects and the endpoint's wrapper were a sixth of the
        instructions of a one-row request; errors still reach the handlers
        `create_app` sets."""
        p = scope["path_params"]
        name, ref = p["name"], p["ref"]
        branch = p.get("branch", "main").replace("~", "/")
        self.admit()  # before the body too: a busy server need not read it
        try:
            body = await intake.read_body(scope, receive, self.limit, self.body_deadlines)
        except ClientDisconnect:  # the caller went away: nothing to answer, and not an error
            scope[observe.SCOPE_DISCONNECTED] = True
            return
        # Only requests whose body is complete take inference capacity: clients still
        # sending (slowly, or stalled until body_timeout_seconds) do not.
        self.admit()
        self.inflight += 1
        try:
            runner = self.versions.cached(branch, name, ref)
            if runner is not None and runner.parses_bodies and runner.takes_body(body):  # in its worker
                call = protocol.Call(False, None, [], [], False, None)
                scope[observe.SCOPE_CALL] = (runner, call)
                status, payload = await runner.run_body(body, self.max_rows, self.timeout, call)
                return await send_json(send, status, payload)
            if len(body) > protocol.LARGE_BODY:  # off the event loop, which serves the others meanwhile
                call = await asyncio.to_thread(bigbody.parse_large, body, self.max_rows)
                runner = self.versions.cached(branch, name, ref)  # again: it may have moved meanwhile
            else:
                call = protocol.parse(body, self.max_rows)
            timeout = min(call.timeout or self.timeout, self.timeout)
            if call.webhook is not None:  # answered once its job is stored; framework.jobs runs it
                version = await self.versions.resolve(branch, name, ref)
                base = self.links.base(scope)
                accepted = await self.jobs.accept(call, body, branch, name, version, base)
                return await send_json(send, 200, accepted)
            if runner is None:
                version = await self.versions.resolve(branch, name, ref)
                # Loading a version (unpickling, setup) is bounded by the same limit as the call.
                runner = await self.versions.runner(branch, name, version, timeout)
            scope[observe.SCOPE_CALL] = (runner, call)
            status, payload = await runner.run(call, timeout)
            if call.response_format == "links" and status == 200:
                url = await self.links.publish_async(self.links.base(scope), name, payload)
                payload = encoding.dumps({"data": url})
        finally:
            self.inflight -= 1
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-length", b"%d" % len(payload)), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})

    def admit(self) -> None:
        if self.inflight >= self.max_inflight:
            raise Overloaded(f"the server is busy ({self.inflight} requests in flight); retry shortly")

    async def list_deployments(self, request: Request) -> Response:
        found = await asyncio.to_thread(self.store.deployments)  # disk reads, off the event loop
        return JSONResponse({"deployments": [
            {"name": name, "branch": branch, "latest": latest}
            for branch, name, latest in found if auth.visible(request.scope, name)
        ]})

    async def describe(self, request: Request) -> Response:
        name = request.path_params["name"]
        branch = request.path_params.get("branch", "main").replace("~", "/")
        return JSONResponse(await asyncio.to_thread(self._describe, branch, name))

    def _describe(self, branch: str, name: str) -> dict[str, Any]:
        numbers = self.store.versions(branch, name)
        if not numbers:
            raise NotFound(
                f"no deployment {name!r} on branch {branch!r}; see GET /v1/ (to run a deployment, "
                "POST to /v1/<name>/<ref>)"
            )
        versions = []
        for v in numbers:
            m = self.store.read_manifest(branch, name, v)
            versions.append({k: m.get(k) for k in ("version", "created_at", "sha256", "size", "git")})
        return {
            "name": name,
            "branch": branch,
            "latest": numbers[-1],
            "aliases": self.store.aliases(branch, name),
            "versions": versions,
        }

    async def batch(self, request: Request) -> Response:
        """GET /v1/batches/<id>: a webhook job's state and delivery attempts."""
        batch_id = request.path_params["batch_id"]
        if not is_batch_id(batch_id):  # not a batch: a deployment named "batches", on a branch
            if not auth.visible(request.scope, "batches"):
                raise Forbidden("this API key is not allowed on deployment 'batches'; use a key for it")
            request.scope["path_params"] = {"name": "batches", "branch": batch_id}
            return await self.describe(request)
        job = await self.jobs.status(batch_id)
        if not auth.visible(request.scope, job["deployment"]):
            raise Forbidden(f"this API key is not allowed on deployment {job['deployment']!r}, "
                            "whose batch this is; use a key for it")
        return JSONResponse(job)

    async def link(self, request: Request) -> Response:
        """GET /v1/<name>/links/<id>?sig=...: an answer given as a link."""
        p, sig = request.path_params, request.query_params.get("sig", "")
        return JSONResponse(await asyncio.to_thread(self.links.read, p["name"], p["link_id"], sig))

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "loaded": len(self.versions.loaded())})


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
        request.scope[observe.SCOPE_ERROR] = exc
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
    from framework.server import tune_gc

    app = create_app(cfg)
    tune_gc()
    return app


def app_from_env() -> Starlette:
    """uvicorn factory for `framework serve --workers N`: config from $FRAMEWORK_CONFIG."""
    return serving_app(cfgmod.load())
