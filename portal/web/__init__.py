"""HTML blueprints (session cookie + CSRF)."""

from __future__ import annotations

from flask import Flask
from sqlalchemy.orm import Session, SessionTransaction

from portal.core.db import begin_write


def transaction(db: Session) -> SessionTransaction:
    """Begin the request's write transaction.

    Reads made earlier in the request (the signed-in customer, the catalog, a link's customer)
    autobegan a read-only transaction, and ``Session.begin()`` refuses to start while one is
    open. That read transaction is ended first; ``expire_on_commit=False`` keeps what it loaded.
    On SQLite the write transaction takes the write lock at once (see ``begin_write``).
    """
    if db.in_transaction():
        db.commit()
    return begin_write(db)


def local_path(target: str | None) -> str | None:
    """``target`` if it is a path on this site, else None (redirects after sign-in or a
    language switch). Browsers drop tabs and newlines from URLs and read ``\\`` as ``/``, so
    ``/<TAB>/evil.example`` would leave the site; any such character is refused."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return None
    if any(ch == "\\" or ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in target):
        return None
    return target


def register(app: Flask) -> None:
    from portal.auth import load_customer
    from portal.loyalty import views as loyalty
    from portal.push import views as push
    from portal.web import account, main, preferences, privacy, sign_ins, unsubscribe, verification
    from portal.web.describe import channel_label

    app.jinja_env.globals["channel_label"] = channel_label
    app.before_request(load_customer)
    for module in (main, account, sign_ins, preferences, unsubscribe, privacy, loyalty, push,
                   verification):
        app.register_blueprint(module.bp)
