"""`InferenceFirst`, which answers the inference routes ahead of Starlette's router and
keeps the route each path matched."""

from __future__ import annotations

import asyncio

from starlette.routing import Route

from framework.serve.app import MATCHES_KEPT, ASGIEndpoint, InferenceFirst


def _scope(method: str, path: str, root_path: str = "") -> dict:
    return {"type": "http", "method": method, "path": path, "root_path": root_path, "headers": []}


def test_each_request_gets_its_own_params_from_the_route_its_path_matched():
    seen: list[tuple[str, dict]] = []

    def endpoint(tag: str):
        async def app(scope, receive, send) -> None:
            seen.append((tag, dict(scope["path_params"])))
            scope["path_params"]["name"] = "changed by the endpoint"  # must not reach the next

        return ASGIEndpoint(app)

    async def fallback(scope, receive, send) -> None:
        seen.append(("router", {}))

    routes = [Route("/v1/{name}/{ref}", endpoint("two"), methods=["POST"]),
              Route("/v1/{name}/{branch}/{ref}", endpoint("three"), methods=["POST"])]
    first = InferenceFirst(fallback, routes)

    async def send(scope: dict) -> list[tuple[str, dict]]:
        seen.clear()
        await first(scope, None, None)
        return seen[:]

    async def main() -> None:
        for _ in range(3):  # the first request matches, the others find the match kept
            assert await send(_scope("POST", "/v1/a/latest")) == [("two", {"name": "a", "ref": "latest"})]
            assert await send(_scope("POST", "/v1/a/dev~x/3")) == [
                ("three", {"name": "a", "branch": "dev~x", "ref": "3"})]
            assert await send(_scope("POST", "/api/v1/b/2", "/api")) == [("two", {"name": "b", "ref": "2"})]
            # The same path without its root path is another path: none of the routes'.
            assert await send(_scope("POST", "/api/v1/b/2")) == [("router", {})]
            assert await send(_scope("GET", "/v1/a/latest")) == [("router", {})]
            assert await send(_scope("POST", "/v1/a")) == [("router", {})]
        # A mount's params join the match, as the router joins them.
        mounted = {**_scope("POST", "/v1/c/1"), "path_params": {"tenant": "t"}}
        assert await send(mounted) == [("two", {"tenant": "t", "name": "c", "ref": "1"})]
        # Random paths do not grow what is kept without bound, and answers stay right.
        for n in range(2 * MATCHES_KEPT + 5):
            assert await send(_scope("POST", f"/v1/d{n}/latest")) == [
                ("two", {"name": f"d{n}", "ref": "latest"})]
            assert len(first.matched) <= MATCHES_KEPT
        assert await send(_scope("POST", "/v1/a/latest")) == [("two", {"name": "a", "ref": "latest"})]

    asyncio.run(main())
