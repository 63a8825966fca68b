"""The OpenAPI document and the browsable reference at /api/docs (server-rendered, no script,
works under the strict CSP)."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Flask, jsonify, render_template, request

from portal.api import api
from portal.api.openapi import document

pages = Blueprint("api_docs", __name__)


@api.bp.route("/openapi.json")
def openapi() -> Any:
    response = jsonify(document(request.host_url))
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


@pages.route("/api/docs")
def reference() -> str:
    spec = document(request.host_url)
    operations = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            operations.append({
                "method": method.upper(), "path": path, "op": op,
                "body": json.dumps(body.get("schema"), indent=2) if body else None,
                "responses": {code: json.dumps(r.get("content", {}).get(
                    "application/json", {}).get("schema"), indent=2)
                    if r.get("content", {}).get("application/json") else None
                    for code, r in op["responses"].items()},
            })
    tags: dict[str, list[dict[str, Any]]] = {}
    for item in operations:
        tags.setdefault(item["op"]["tags"][0], []).append(item)
    return render_template("api/docs.html", spec=spec, tags=tags)


def add_bare_route(app: Flask) -> None:
    """Benchmarks only (``CARNET_BENCH_BARE=1``): constant JSON through the same server and
    middleware, to separate framework cost from decision cost."""

    from portal.security import csrf

    @csrf.exempt
    def _bare() -> Any:
        return jsonify({"decision": "send", "allowed": True, "reason": "consented"})

    app.add_url_rule("/api/v1/_bare", "api_bare", _bare, methods=["POST", "GET"])
