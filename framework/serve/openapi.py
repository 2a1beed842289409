"""`GET /openapi.json`: the routes, with each deployment's parameters from its type hints.

Built from the manifests of each deployment's latest version
(`signature.parameters`), so it needs nothing unpickled. Annotations that are
not plain JSON types (`int`, `float`, `str`, `bool`, `list`, `dict`) are
described as "any value". Routes and parameters only: a deployment's source
stays with the store's owner (`framework show`). A deployment whose latest
manifest cannot be read is left out (and logged); the others are described.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from framework.serve import auth
from framework import encoding
from framework.errors import FrameworkError
from framework.store.base import Store

if TYPE_CHECKING:
    from framework.serve.runtime import Runtime

log = logging.getLogger("framework.serve.openapi")

JSON_TYPES = {"int": "integer", "float": "number", "str": "string", "bool": "boolean",
              "list": "array", "dict": "object"}
ID = {"oneOf": [{"type": "string"}, {"type": "number"}], "description": "unique in the batch"}
ERROR = {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "string"}, "errors": {"type": "array", "items": {"type": "array"}}}}


def _schema(param: dict[str, Any]) -> dict[str, Any]:
    kind = JSON_TYPES.get(str(param.get("annotation")))
    out: dict[str, Any] = {"type": kind} if kind else {}
    out["title"] = param["name"]
    if param.get("default") is not None:
        out["description"] = f"default {param['default']}"
    return out


def request_schema(manifest: dict[str, Any]) -> dict[str, Any]:
    """The body of a call to one deployment: a single call or batch rows."""
    params = [p for p in (manifest.get("signature") or {}).get("parameters", [])
              if p["kind"] in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    schemas = [_schema(p) for p in params]
    single = schemas[0] if len(schemas) == 1 else {"oneOf": [
        {"type": "array", "prefixItems": schemas},
        {"type": "object", "properties": {p["name"]: s for p, s in zip(params, schemas)}},
    ]}
    row = {"type": "array", "prefixItems": [ID, *schemas], "minItems": 1,
           "description": "[id, *arguments]"}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"oneOf": [
                {"type": "array", "items": row, "description": "a batch of rows"},
                {**single, "description": "a single call"},
            ]},
            "batch": {"type": "boolean", "description": "false forces a single call"},
            "partial": {"type": "boolean", "description": "answer 200 with data and errors"},
            "timeout_seconds": {"type": "number", "exclusiveMinimum": 0},
            "response_webhook": {"type": "string", "format": "uri", "description":
                                 "answer {\"batchId\"} now, POST the answer to this URL later"},
            "response_webhook_ignore_timeout": {"type": "boolean", "description":
                                                "let a webhook call run past timeout_seconds"},
            "response_format": {"enum": ["links"], "description":
                                "answer {\"data\": url}: a signed, expiring link to the answer"},
        },
    }


def _operation(name: str, manifest: dict[str, Any], branch_param: bool) -> dict[str, Any]:
    params = [{"name": "ref", "in": "path", "required": True, "schema": {"type": "string"},
               "description": "latest, a version number or an alias"}]
    if branch_param:
        params.insert(0, {"name": "branch", "in": "path", "required": True,
                          "schema": {"type": "string"}, "description": "'/' written as '~'"})
    answers = {str(s): {"description": d, "content": {"application/json": {"schema": ERROR}}}
               for s, d in ((400, "malformed body"), (401, "missing or invalid API key"),
                            (403, "API key not allowed here"), (404, "unknown deployment or ref"),
                            (408, "body not sent within server.body_timeout_seconds"),
                            (413, "body too large"), (422, "the function raised"),
                            (424, "the version's environment could not be built"),
                            (503, "over capacity; see Retry-After"), (504, "past its time limit"))}
    answers["200"] = {"description": "results", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"data": {}, "errors": {"type": "array"}}}}}}
    return {"post": {
        "summary": (manifest.get("signature") or {}).get("text") or name,
        "parameters": params,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": request_schema(manifest)}}},
        "responses": answers,
    }}


def build(store: Store, visible: Any = lambda name: True) -> dict[str, Any]:
    """The OpenAPI 3.1 document for every deployment `visible(name)` allows."""
    paths: dict[str, Any] = {}
    for branch, name, latest in store.deployments():
        if not visible(name):
            continue
        try:
            manifest = store.read_manifest(branch, name, latest)
        except FrameworkError as exc:  # damaged or unreadable: one deployment, not the document
            log.error("/openapi.json leaves out %s on branch %r: %s", name, branch, exc)
            continue
        if branch == "main":
            paths[f"/v1/{name}/{{ref}}"] = _operation(name, manifest, False)
            paths[f"/v1/{name}/{{branch}}/{{ref}}"] = _operation(name, manifest, True)
        else:
            paths[f"/v1/{name}/{branch.replace('/', '~')}/{{ref}}"] = _operation(
                name, manifest, False)
    ops = {"/v1/": "deployments and their latest version", "/v1/{name}": "a deployment's versions",
           "/healthz": "health (open)", "/livez": "liveness (open)",
           "/readyz": "readiness: the store can be read (open)",
           "/metrics": "Prometheus metrics (open)", "/openapi.json": "this document"}
    for path, summary in ops.items():
        op: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": "OK"}}}
        if "{name}" in path:
            op["parameters"] = [{"name": "name", "in": "path", "required": True,
                                 "schema": {"type": "string"}}]
        paths[path] = {"get": op}
    return {
        "openapi": "3.1.0",
        "info": {"title": "framework inference API", "version": "1"},
        "paths": paths,
        "components": {"securitySchemes": {"apiKey": {
            "type": "apiKey", "in": "header", "name": "Authorization",
            "description": "the key itself, or 'Bearer <key>'; only where keys are configured"}}},
        "security": [{}, {"apiKey": []}],
    }


def endpoint(rt: Runtime) -> Any:
    async def openapi_json(request: Request) -> Response:
        doc = await asyncio.to_thread(build, rt.store, lambda n: auth.visible(request.scope, n))
        return Response(encoding.dumps(doc), media_type="application/json")

    return openapi_json
