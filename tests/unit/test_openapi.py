"""The OpenAPI document's request schema, built from a manifest's signature."""

from __future__ import annotations

from framework.serve.openapi import request_schema


def _manifest(*params: tuple[str, str]) -> dict:
    return {"signature": {"text": "(...)", "parameters": [
        {"name": n, "kind": "POSITIONAL_OR_KEYWORD", "annotation": a, "default": None}
        for n, a in params]}}


def test_the_schema_names_parameters_and_every_request_option():
    schema = request_schema(_manifest(("a", "int"), ("b", "float")))
    props = schema["properties"]
    assert set(props) == {"data", "batch", "partial", "timeout_seconds", "response_webhook",
                          "response_webhook_ignore_timeout", "response_format"}
    row = props["data"]["oneOf"][0]["items"]
    assert [s.get("type") for s in row["prefixItems"][1:]] == ["integer", "number"]
    assert props["response_format"]["enum"] == ["links"]


def test_a_one_parameter_deployment_takes_a_bare_value_as_a_single_call():
    single = request_schema(_manifest(("x", "str")))["properties"]["data"]["oneOf"][1]
    assert single["type"] == "string" and single["title"] == "x"
