"""Error answers: friendly localized pages for people, RFC 9457 problem+json under /api."""

from __future__ import annotations

import logging

from flask import Flask, Response, current_app, g, render_template, request
from flask_babel import gettext as _
from flask_wtf.csrf import CSRFError
from sqlalchemy.exc import DBAPIError, OperationalError
from werkzeug.exceptions import HTTPException, MethodNotAllowed

log = logging.getLogger("carnet.errors")

# A problem often names what the caller sent (an unknown field, a bad value). JSON lets any
# character be written as \uXXXX, so the markup characters are: every JSON parser reads the
# same text back, and a body that some client shows or sniffs as HTML carries no live markup.
_HTML_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "'": "\\u0027",
                            "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _wants_problem() -> bool:
    return request.path.startswith("/api/") or request.path.startswith("/wallet/")


def problem(status: int, type_: str, title: str, detail: str | None = None,
            **extra: object) -> Response:
    body: dict[str, object] = {"type": f"https://carnet.dev/problems/{type_}", "title": title,
                               "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    text = current_app.json.dumps(body).translate(_HTML_SAFE) + "\n"
    return Response(text, status=status, mimetype="application/problem+json")


def _titles() -> dict[int, str]:
    return {
        400: _("The request could not be understood."),
        403: _("You are not allowed to do that."),
        404: _("This page does not exist."),
        405: _("This page cannot be used that way."),
        413: _("What you sent is too large."),
        429: _("Too many requests. Please wait a moment."),
        500: _("Something went wrong on our side. Your data is safe; please try again."),
        503: _("The service is briefly unavailable. Please try again in a moment."),
    }


def init_app(app: Flask) -> None:
    @app.errorhandler(CSRFError)
    def _csrf(exc: CSRFError) -> tuple[str, int] | Response:
        if _wants_problem():
            return problem(400, "csrf", "CSRF token missing or invalid")
        return render_template("errors/error.html", code=400, message=_(
            "This form expired or was sent from elsewhere. Go back, reload the page and try "
            "again.")), 400

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> tuple[str, int] | Response:
        code = exc.code or 500
        if _wants_problem():
            # The class's own sentence: an instance's may carry an exception's text (Flask's
            # "Failed to decode JSON object: …").
            response = problem(code, exc.name.lower().replace(" ", "-"), exc.name,
                               type(exc).description)
        else:
            message = _titles().get(code, exc.name)
            response = Response(render_template("errors/error.html", code=code,
                                                message=message), status=code)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            # RFC 9110 15.5.6: a 405 names the methods the resource does support.
            response.headers["Allow"] = ", ".join(sorted(set(exc.valid_methods)))
        if code == 429 and exc.response is not None and exc.response.headers.get("Retry-After"):
            response.headers["Retry-After"] = exc.response.headers["Retry-After"]
        return response

    @app.errorhandler(OperationalError)
    @app.errorhandler(DBAPIError)
    def _database(exc: Exception) -> Response:
        log.error("database unavailable: %s", exc)
        # The failed transaction was rolled back, which expired the signed-in customer:
        # reading its locale for this page would go back to the database and turn the 503
        # into a 500. The page is rendered as for a visitor (session or browser language).
        g.customer = None
        if _wants_problem():
            response = problem(503, "unavailable", "Database unavailable",
                               "Retry after the number of seconds in Retry-After.")
        else:
            response = Response(render_template("errors/error.html", code=503,
                                                message=_titles()[503]), status=503)
        response.headers["Retry-After"] = "5"
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error")
        if _wants_problem():
            return problem(500, "internal", "Internal error")
        return Response(render_template("errors/error.html", code=500,
                                        message=_titles()[500]), status=500)
