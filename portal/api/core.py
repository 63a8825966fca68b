"""The API's one declaration point: each operation states its path, scopes, query and body
schemas and responses once. The same declaration authenticates, rate-limits and validates the
request, and feeds the OpenAPI document (:mod:`portal.api.openapi`)."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, g, jsonify, request
from sqlalchemy.exc import OperationalError

from portal.api.schema import Field, FieldError, Invalid, Obj
from portal.core import ratelimit
from portal.core.db import get_session, read_outside_transactions
from portal.core.errors import problem
from portal.services import api_keys

JSON_TYPES = ("application/json",)
log = logging.getLogger("carnet.api")


@dataclass
class Operation:
    method: str
    rule: str
    endpoint: str
    summary: str
    tag: str
    scopes: tuple[str, ...]
    body: Obj | None
    query: Obj | None
    responses: dict[int, tuple[str, dict[str, Any] | None]]
    description: str = ""
    media: dict[str, str] = field(default_factory=dict)  # extra response media types
    # Request headers the view reads itself (published, not validated here: the view answers
    # its own problem types, e.g. Idempotency-Key).
    headers: Obj | None = None
    # Only reads: the request runs outside a transaction on PostgreSQL (no BEGIN/COMMIT).
    read_only: bool = False
    # Problems the view itself answers beyond those of the machinery (see
    # :func:`portal.api.openapi.machinery_problems`), status -> when; published in the document.
    problems: dict[int, str] = field(default_factory=dict)
    # Path parameters whose values are narrower than "a string of 1 to 255 characters" (the
    # view refuses the others): published in the document.
    path_fields: dict[str, Field] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", self.rule)

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"<(?:[a-z]+:)?([a-z_]+)>", self.rule)


OPERATIONS: list[Operation] = []


def bad_request(errors: list[FieldError], status: int = 422) -> Response:
    return problem(status, "invalid-request", "The request is not valid.",
                   "; ".join(f"{e.field}: {e.message}" for e in errors),
                   errors=[e.as_dict() for e in errors])


def unauthorized(detail: str) -> Response:
    response = problem(401, "unauthorized", "A valid API key is required.", detail)
    response.headers["WWW-Authenticate"] = 'Bearer realm="carnet"'
    return response


def _bearer() -> str | None:
    """The key of ``Authorization: Bearer <key>``, or None."""
    scheme, _, raw = request.headers.get("Authorization", "").partition(" ")
    return raw.strip() if scheme.lower() == "bearer" and raw.strip() else None


def _authenticate(scopes: tuple[str, ...]) -> Response | None:
    raw = _bearer()
    if raw is None:
        return unauthorized("Send Authorization: Bearer <key>.")
    session = get_session()
    if session.adopts_reads:  # the view continues this transaction (see RequestSession)
        key = api_keys.authenticate(session, raw)
    else:
        with session.begin():
            key = api_keys.authenticate(session, raw)
    return _admit(key, scopes)


def _admit(key: api_keys.Caller | None, scopes: tuple[str, ...]) -> Response | None:
    """After the key was read: 401 if there is none, 403 without the scope, 429 over the rate
    limit; otherwise None, the key's use recorded (once a minute) and ``g.api_key`` set."""
    if key is not None and api_keys.needs_touch(key):
        session = get_session()  # only then: a decision needs no Session otherwise
        try:
            with session.begin():
                api_keys.touch(session, key)
        except OperationalError:
            log.warning("could not record the use of API key %s", key.id)
    if key is None:
        response = unauthorized("The key is unknown or was revoked.")
        response.headers["WWW-Authenticate"] = 'Bearer realm="carnet", error="invalid_token"'
        return response
    if scopes and not set(scopes) & set(key.scopes):
        response = problem(403, "insufficient-scope", "This key lacks the scope required.",
                           f"Needs one of: {', '.join(scopes)}.", required_scopes=list(scopes))
        response.headers["WWW-Authenticate"] = (
            f'Bearer realm="carnet", error="insufficient_scope", scope="{" ".join(scopes)}"')
        return response
    g.api_key = key
    wait = ratelimit.hit("api", str(key.id))
    if wait:
        response = problem(429, "rate-limited", "Too many requests for this key.",
                           f"Retry after {wait} seconds.")
        response.headers["Retry-After"] = str(wait)
        return response
    return None


@dataclass(frozen=True)
class Admission:
    """For an operation that reads the caller's key in its own first statement
    (``key_in_view``): what that statement needs (:data:`api_keys.KEY_GUARD` and its
    parameters), and :meth:`admit` to call with what it found before answering anything
    else. The answers are those of any other operation, in the same order: 401, 403 and 429
    before the view's own."""

    raw: str
    scopes: tuple[str, ...]
    guard = api_keys.KEY_GUARD

    @property
    def guard_params(self) -> dict[str, str]:
        return api_keys.guard_params(self.raw)

    def admit(self, guarded: list[dict[str, Any]]) -> Response | None:
        return _admit(api_keys.caller_of(guarded), self.scopes)


@contextmanager
def timed(phase: str) -> Iterator[None]:
    """Time a phase of the request for the ``Server-Timing`` header."""
    started = time.perf_counter()
    try:
        yield
    finally:
        g.setdefault("timings", []).append((phase, time.perf_counter() - started))


def fast_json(data: Any, status: int = 200) -> Response:
    """A JSON answer serialised with orjson: the decision endpoints return up to 10,000
    objects, where the standard encoder (sorting keys) cost more than the decisions."""
    with timed("encode"):
        body = orjson.dumps(data)
    return current_app.response_class(body, status=status, mimetype="application/json")


def _server_timing(started: float) -> str:
    parts = [f"{name};dur={seconds * 1000:.1f}" for name, seconds in g.pop("timings", [])]
    parts.append(f"app;dur={(time.perf_counter() - started) * 1000:.1f}")
    return ", ".join(parts)


# What a body the parser refused gets, by cause: fixed sentences, never the exception's text
# (which names the interpreter's limits and settings, codecs and byte offsets).
UNREADABLE_BODY = {
    "utf8": "The body is not valid UTF-8.",
    "digits": "The body holds a number with too many digits.",
    "depth": "The body is nested too deeply.",
    "surrogate": "The body holds text that is not valid Unicode.",
    "json": "The body is not valid JSON.",
}


def unreadable(cause: str) -> Response:
    """The 400 problem for a body that cannot be read as JSON."""
    detail = UNREADABLE_BODY[cause]
    return problem(400, "malformed-json", "The body is not valid JSON.", detail,
                   errors=[{"field": "body", "code": f"malformed_{cause}", "message": detail}])


def _cause(exc: BaseException) -> str:
    if isinstance(exc, UnicodeError):
        return "utf8"
    if isinstance(exc, RecursionError):
        return "depth"
    if isinstance(exc, ValueError) and not isinstance(exc, json.JSONDecodeError) \
            and "digits" in str(exc):
        return "digits"  # the interpreter's limit on integer conversion (sys.int_info)
    return "json"


def parse_json(raw: bytes) -> Any:
    """``raw`` as JSON, or the :func:`unreadable` problem. orjson refuses what the standard
    library accepts (integers past 64 bits, NaN); those still reach validation as before,
    but text that cannot be encoded back (lone surrogates, ``"\\ud800"``) is refused here."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeError, RecursionError) as exc:
        return unreadable(_cause(exc))
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return unreadable("surrogate")
    except (ValueError, RecursionError):  # NaN and the like are the validators' business
        pass
    return data


def _read_body(spec: Obj) -> dict[str, Any] | Response:
    if request.mimetype not in JSON_TYPES:
        return problem(415, "unsupported-media-type", "Send application/json.",
                       f"Content-Type was '{request.mimetype or 'missing'}'.")
    data = parse_json(request.get_data(cache=True))
    if isinstance(data, Response):
        return data
    try:
        return spec.parse(data)
    except Invalid as exc:
        return bad_request(exc.errors)


class Api:
    """A blueprint plus the operation registry."""

    def __init__(self, name: str, prefix: str = "/api/v1") -> None:
        self.bp = Blueprint(name, __name__, url_prefix=prefix)
        self.prefix = prefix

    def op(self, method: str, rule: str, *, summary: str, tag: str,
           scopes: tuple[str, ...] = (), body: Obj | None = None, query: Obj | None = None,
           responses: dict[int, tuple[str, dict[str, Any] | None]] | None = None,
           description: str = "", media: dict[str, str] | None = None,
           headers: Obj | None = None, read_only: bool = False, key_in_view: bool = False,
           problems: dict[int, str] | None = None, path: dict[str, Field] | None = None
           ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a view as an operation. ``key_in_view``: the view reads the caller's key
        itself, in its first statement, and receives an :class:`Admission` (``admission``)
        to call before anything else; a request whose key is missing or malformed, or whose
        arguments are invalid, is authenticated here as usual instead. ``read_only``: the
        request's Session reads in autocommit (:func:`portal.core.db.read_outside_transactions`);
        a ``key_in_view`` view that reads through :func:`portal.core.db.reads` has no Session.
        ``problems``: the statuses the view answers itself (404, 409, 422...), with when;
        ``path``: the path parameters narrower than the default, as the view checks them."""
        assert not key_in_view or scopes, "key_in_view needs scopes"
        def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
            operation = Operation(method, self.prefix + rule, f"{self.bp.name}.{view.__name__}",
                                  summary, tag, scopes, body, query, responses or {},
                                  description or (view.__doc__ or "").strip(), media or {},
                                  headers, read_only, problems or {}, path or {})
            OPERATIONS.append(operation)

            @wraps(view)
            def wrapper(**path: Any) -> Any:
                started = time.perf_counter()
                response = current_app.make_response(answer(**path))
                # Time spent in the application, before any streamed body is produced.
                response.headers["Server-Timing"] = _server_timing(started)
                return response

            def answer(**path: Any) -> Any:
                raw = _bearer() if key_in_view else None
                deferred = raw is not None and api_keys.well_formed(raw)
                if not deferred:
                    if read_only:
                        read_outside_transactions(get_session())
                    with timed("auth"):
                        denied = _authenticate(scopes) if scopes else None
                    if denied is not None:
                        return denied
                    if read_only:  # again: recording the key's use (once a minute) committed
                        read_outside_transactions(get_session())
                kwargs = arguments(path)
                if isinstance(kwargs, Response):
                    # the key first, as for any operation: 401/403/429 before 404/422
                    return (_authenticate(scopes) or kwargs) if deferred else kwargs
                if deferred:
                    assert raw is not None
                    kwargs["admission"] = Admission(raw, scopes)
                result = view(**kwargs)
                if isinstance(result, tuple) and isinstance(result[0], dict | list):
                    return (jsonify(result[0]), *result[1:])
                if isinstance(result, dict | list):
                    return jsonify(result)
                return result

            def arguments(path: dict[str, Any]) -> dict[str, Any] | Response:
                """The view's arguments from the path, the query and the body, or the
                problem with them."""
                if any(isinstance(v, str) and ("\x00" in v or len(v) > 255)
                       for v in path.values()):
                    return not_found("no such resource")
                kwargs: dict[str, Any] = dict(path)
                if query is not None:
                    try:
                        kwargs["query"] = query.parse_query(request.args.to_dict())
                    except Invalid as exc:
                        return bad_request(exc.errors)
                if body is not None:
                    with timed("parse"):
                        parsed = _read_body(body)
                    if isinstance(parsed, Response):
                        return parsed
                    kwargs["body"] = parsed
                return kwargs

            self.bp.add_url_rule(rule, view.__name__, wrapper, methods=[method])
            return wrapper

        return decorate


def not_found(what: str, field_name: str | None = None) -> Response:
    extra: dict[str, Any] = {}
    if field_name:
        extra["errors"] = [{"field": field_name, "code": "not_found", "message": what}]
    return problem(404, "not-found", "Not found.", what, **extra)


def conflict(type_: str, detail: str, field_name: str) -> Response:
    return problem(409, type_, "Conflict with an existing record.", detail,
                   errors=[{"field": field_name, "code": type_.replace("-", "_"),
                            "message": detail}])


def unprocessable(code: str, detail: str, field_name: str) -> Response:
    return bad_request([FieldError(field_name, code, detail)])


def config(name: str) -> Any:
    return current_app.config[name]
