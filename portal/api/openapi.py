"""The OpenAPI 3.1 document, built from the operation registry (:data:`core.OPERATIONS`):
the schemas published are the objects that validate requests."""

from __future__ import annotations

from typing import Any

from portal.api.core import OPERATIONS, Operation
from portal.api.schema import NO_NUL, Obj
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
MACHINERY_PROBLEMS = {
    400: "Malformed JSON.", 401: "Missing, unknown or revoked key.",
    403: "The key lacks the scope.", 404: "Not found.",
    413: "The body is larger than the API accepts.",
    415: "Content-Type is not application/json.",
    422: "Invalid request: see errors[].field and errors[].code.",
    429: "Rate limited: retry after Retry-After seconds.",
}
# Headers every answer of a status carries (set where the problem is made, in core).
PROBLEM_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string"},
                               "description": 'Bearer realm="carnet", with the error.'}},
    429: {"Retry-After": {"required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"},
                          "description": "Seconds to wait before the next request."}},
}


def machinery_problems(op: Operation) -> set[int]:
    """The statuses :class:`core.Api` answers around the view: the key (401, 403, 429), the
    path parameters (404: NUL or over 255 characters), the query (422) and the body (400
    malformed, 413 too large, 415 not JSON, 422 invalid)."""
    codes: set[int] = set()
    if op.scopes:
        codes |= {401, 403, 429}
    if op.path_params:
        codes.add(404)
    if op.query is not None:
        codes.add(422)
    if op.body is not None:
        codes |= {400, 413, 415, 422}
    return codes


def _problem(status: int, description: str) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    if status in PROBLEM_HEADERS:
        out["headers"] = PROBLEM_HEADERS[status]
    return out


def _path_parameter(op: Operation, name: str) -> dict[str, Any]:
    spec = op.path_fields.get(name)
    if spec is not None:
        schema = spec.schema()
    elif f"<int:{name}>" in op.rule:
        schema = {"type": "integer", "minimum": 0}
    else:
        schema = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": NO_NUL}
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query_parameters(query: Obj) -> list[dict[str, Any]]:
    """One parameter per field; a query whose fields go in groups (``one_of``) is one
    object parameter, exploded as ``?name=value&...``, so the groups can be stated."""
    if query.one_of:
        return [{"name": query.name or "query", "in": "query", "required": True,
                 "style": "form", "explode": True, "schema": query.schema()}]
    return [{"name": name, "in": "query", "required": name in query.required,
             "schema": spec.schema()} for name, spec in query.fields.items()]


def _responses(op: Operation) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, (description, schema) in op.responses.items():
        entry: dict[str, Any] = {"description": description}
        if schema is not None:
            entry["content"] = {"application/json": {"schema": schema}}
            for media, text in op.media.items():
                entry["content"][media] = {"schema": {"type": "string"},
                                           "x-description": text}
        responses[str(status)] = entry
    problems = {code: MACHINERY_PROBLEMS[code] for code in machinery_problems(op)}
    for code, when in op.problems.items():
        problems[code] = f"{problems[code]} {when}" if code in problems else when
    for code in sorted(problems):
        responses.setdefault(str(code), _problem(code, problems[code]))
    return responses


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
    params = [_path_parameter(op, name) for name in op.path_params]
    if op.query is not None:
        params += _query_parameters(op.query)
    if op.headers is not None:
        for name, spec in op.headers.fields.items():
            params.append({"name": name, "in": "header",
                           "required": name in op.headers.required, "schema": spec.schema()})
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": op.body.schema()}}}
    out["responses"] = _responses(op)
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
