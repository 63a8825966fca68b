"""The sending-systems API under /api/v1: bearer keys, JSON, RFC 9457 problems, OpenAPI 3.1."""

from __future__ import annotations

from flask import Flask

from portal.api.core import Api, Operation

api = Api("api")


def operations() -> list[Operation]:
    """Every declared operation (importing the view modules declares them)."""
    from portal.api import (  # noqa: F401
        customers,
        decisions,
        docs,
        events,
        loyalty,
        messaging,
        push,
        wallet,
    )
    from portal.api.core import OPERATIONS

    return OPERATIONS


def init_app(app: Flask) -> None:
    from portal.api import docs
    from portal.security import csrf

    operations()
    csrf.exempt(api.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(docs.pages)
    if app.config.get("BENCH_BARE"):
        docs.add_bare_route(app)
