"""The OpenAPI 3.1 document, built from the operation registry (:data:`core.OPERATIONS`):
the schemas published are the objects that validate requests."""

from __future__ import annotations

from typing import Any

from portal.api.core import OPERATIONS, Operation
from portal.services import api_keys

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details.",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string", "format": "uri"},
        "title": {"type": "string"}, "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {"type": "array", "items": {
            "type": "object", "required": ["field", "code"],
            "properties": {"field": {"type": "string"}, "code": {"type": "string"},
                           "message": {"type": "string"}}}},
    },
}
STANDARD_ERRORS = {
    "400": "Malformed JSON.", "401": "Missing, unknown or revoked key.",
    "403": "The key lacks the scope.", "404": "Not found.",
    "415": "Content-Type is not application/json.",
    "422": "Invalid request: see errors[].field and errors[].code.",
    "429": "Rate limited: retry after Retry-After seconds.",
}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/problem+json": {"schema": {
                "$ref": "#/components/schemas/Problem"}}}}


def _operation(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operationId": op.endpoint.split(".", 1)[1], "summary": op.summary, "tags": [op.tag],
        "security": [{"bearer": list(op.scopes)}] if op.scopes else [],
    }
    if op.description:
        out["description"] = op.description
    if op.scopes:
        out["description"] = (out.get("description", "") + "\n\nScopes (any of): "
                              + ", ".join(f"`{s}`" for s in op.scopes)).strip()
        out["x-scopes"] = list(op.scopes)
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True,
         "schema": {"type": "integer", "minimum": 0} if f"<int:{name}>" in op.rule else
         {"type": "string", "minLength": 1, "maxLength": 255}}
        for name in op.path_params
    ]
    if op.query is not None:
        for name, spec in op.query.fields.items():
            params.append({"name": name, "in": "query", "required": name in op.query.required,
                           "schema": spec.schema()})
    if op.headers is not None:
        for name, spec in op.headers.fields.items():
            params.append({"name": name, "in": "header",
                           "required": name in op.headers.required, "schema": spec.schema()})
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": op.body.schema()}}}
    responses: dict[str, Any] = {}
    for status, (description, schema) in op.responses.items():
        entry: dict[str, Any] = {"description": description}
        if schema is not None:
            entry["content"] = {"application/json": {"schema": schema}}
            for media, text in op.media.items():
                entry["content"][media] = {"schema": {"type": "string"},
                                           "x-description": text}
        responses[str(status)] = entry
    codes = ["401", "403", "429"] if op.scopes else []
    if op.body is not None:
        codes += ["400", "415", "422"]
    elif op.query is not None:
        codes.append("422")
    if op.path_params or op.body is not None:
        codes.append("404")
    for code in sorted(set(codes)):
        responses.setdefault(code, _problem(STANDARD_ERRORS[code]))
    if any(s in ("201", "200") for s in responses) and op.body is not None:
        responses.setdefault("409", _problem("Conflict with an existing record."))
    out["responses"] = responses
    return out


def document(server_url: str = "/") -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Carnet API", "version": "1.0.0",
            "description": "Consent decisions, audiences, identity, suppressions, the change "
                           "feed and webhooks for sending systems. Authenticate with "
                           "`Authorization: Bearer <key>`; errors are RFC 9457 problem "
                           "documents with a stable `type` and the field at fault.",
        },
        "servers": [{"url": server_url}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "An API key created with "
                                           "`flask --app app api-keys create --scope …`; "
                                           "each operation lists the scopes it accepts. "
                                           "Scopes: " + ", ".join(
                                               f"`{s}`" for s in api_keys.SCOPES) + ". "
                                           "`links:write` mints unsubscribe links, which "
                                           "withdraw consent when followed."}},
            "schemas": {"Problem": PROBLEM_SCHEMA},
        },
    }
