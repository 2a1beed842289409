"""The HTTP side: the Starlette app and what it needs per request.

`app` (routes, middleware, lifespan), `runtime` (the request path), `answers`
(errors become HTTP answers), `intake` + `bigbody` (bodies), `auth`, `observe`,
`metrics`, `accesslog`, `scope`, `openapi`, `refresh`, `jobs`, `leases`,
`webhooks`, `links`, `server` (uvicorn and gc set-up).
"""
