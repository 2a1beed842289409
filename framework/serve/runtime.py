"""The state behind the routes, and the request path of an inference call."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NamedTuple

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from framework import config as cfgmod
from framework import encoding, protocol
from framework.errors import Forbidden, FrameworkError, NotFound, Overloaded
from framework.execute.environments import Environments, build_all, wanted
from framework.execute.versions import VersionCache
from framework.serve import auth, bigbody, intake
from framework.serve.answers import JSONResponse, answer_of, send_json
from framework.serve.jobs import Jobs, is_batch_id
from framework.serve.links import Links
from framework.serve.scope import SCOPE_CALL, SCOPE_DISCONNECTED

log = logging.getLogger("framework.runtime")


class Accepted(NamedTuple):
    """What the metrics and the access log read of a runner, for a call handed to a job."""

    labels: tuple[str, str, str]
    version: int


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
                                     isolation=s["isolation"], worker_nice=s["worker_nice"],
                                     environments=self.environments)
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
        """POST /v1/<name>/<ref>: an ASGI app, not a Starlette endpoint, which would
        build request and response objects this path does not need; errors still
        reach the handlers `create_app` sets."""
        p = scope["path_params"]
        name, ref = p["name"], p["ref"]
        branch = p.get("branch", "main").replace("~", "/")
        self.admit()  # before the body too: a busy server need not read it
        try:
            body = await intake.read_body(scope, receive, self.limit, self.body_deadlines)
        except ClientDisconnect:  # the caller went away: nothing to answer, and not an error
            scope[SCOPE_DISCONNECTED] = True
            return
        # Only requests whose body is complete take inference capacity: clients still
        # sending (slowly, or stalled until body_timeout_seconds) do not.
        self.admit()
        self.inflight += 1
        try:
            runner = self.versions.cached(branch, name, ref)
            # Options are the server's to read: a body naming none goes raw to a version that
            # parses bodies where it runs, whatever its size. A large one is scanned a piece
            # at a time.
            raw = runner is not None and runner.parses_bodies
            if raw and len(body) > protocol.LARGE_BODY:
                raw = await bigbody.only_data(body)
                runner = self.versions.cached(branch, name, ref)  # the scan let the loop run: again
                raw = raw and runner is not None and runner.parses_bodies
            elif raw:
                raw = protocol.only_data(body)
            if raw:  # parsed, run and encoded on its thread or in its worker
                assert runner is not None
                call = protocol.Call(False, None, [], [], False, None)
                scope[SCOPE_CALL] = (runner, call)
                status, payload = await runner.run_body(body, self.max_rows, self.timeout, call)
                return await send_json(send, status, payload)
            if len(body) > protocol.LARGE_BODY:  # off the event loop, which serves the others meanwhile
                call = await asyncio.to_thread(bigbody.parse_large, body, self.max_rows)
                runner = self.versions.cached(branch, name, ref)  # again: it may have moved meanwhile
            else:
                call = protocol.parse(body, self.max_rows)
            timeout = min(call.timeout or self.timeout, self.timeout)
            if call.webhook is not None:  # answered once its job is stored; framework.serve.jobs runs it
                version = await self.versions.resolve(branch, name, ref)
                base = self.links.base(scope)
                accepted = await self.jobs.accept(call, body, branch, name, version, base)
                scope[SCOPE_CALL] = (Accepted((name, branch, str(version)), version), call)
                return await send_json(send, 200, accepted)
            if runner is None:
                version = await self.versions.resolve(branch, name, ref)
                # Loading a version (unpickling, setup) is bounded by the same limit as the call.
                runner = await self.versions.runner(branch, name, version, timeout)
            scope[SCOPE_CALL] = (runner, call)
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
