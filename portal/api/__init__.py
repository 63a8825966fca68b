"""The sending-systems API under /api/v1: bearer keys, JSON, RFC 9457 problems, OpenAPI 3.1."""

from __future__ import annotations

from flask import Flask, request

from portal.api.core import Api, Operation

api = Api("api")
# A full batch (10,000 decisions) stays well inside this; the portal's forms keep the app-wide
# MAX_CONTENT_LENGTH (2 MB). Anything larger is 413 before a byte of it is parsed.
API_MAX_BODY_BYTES = 8 * 1024 * 1024


@api.bp.before_request
def _body_limit() -> None:
    request.max_content_length = API_MAX_BODY_BYTES


def operations() -> list[Operation]:
    """Every declared operation (importing the view modules declares them)."""
    from portal.api import (  # noqa: F401
        customers,
        decisions,
        docs,
        events,
        messaging,
        wallet,
    )
    from portal.api.core import OPERATIONS
    from portal.loyalty import api as loyalty  # noqa: F401
    from portal.push import api as push  # noqa: F401

    return OPERATIONS


def init_app(app: Flask) -> None:
    from portal.api import docs
    from portal.core.security import csrf

    operations()
    csrf.exempt(api.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(docs.pages)
    if app.config.get("BENCH_BARE"):
        docs.add_bare_route(app)
