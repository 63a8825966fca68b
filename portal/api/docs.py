"""The OpenAPI document and the browsable reference at /api/docs (server-rendered, no script,
works under the strict CSP)."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify, render_template

from portal.api import api
from portal.api.openapi import document

pages = Blueprint("api_docs", __name__)


def server_url() -> str:
    """The configured public address (``BASE_URL``), never the request's ``Host`` header: the
    document is cached by shared caches, so a forged Host would be served to everyone."""
    return str(current_app.config["BASE_URL"]).rstrip("/") or "/"


@api.bp.route("/openapi.json")
def openapi() -> Any:
    response = jsonify(document(server_url()))
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


@pages.route("/api/docs")
def reference() -> str:
    spec = document(server_url())
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

    from portal.core.security import csrf

    @csrf.exempt
    def _bare() -> Any:
        return jsonify({"decision": "send", "allowed": True, "reason": "consented"})

    app.add_url_rule("/api/v1/_bare", "api_bare", _bare, methods=["POST", "GET"])
