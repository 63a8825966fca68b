"""``Idempotency-Key`` for API writes that must happen once (loyalty accruals, reversals).

The header is required on these operations. The key is scoped to the API key that sends it;
the request's fingerprint is the SHA-256 of the method, the path and the body as canonical
JSON. :func:`run_once` claims the key, runs the write and keeps its answer in one transaction
(see :mod:`portal.services.idempotency`), so a retry, or the same request sent twice at once,
gets the original status and body with ``Idempotent-Replayed: true`` and the write happens once.

Answers kept: the write's success and its domain refusals (a duplicate source_ref, too few
points...), which are the same answer for the same request. Not kept: authentication and
input validation (answered before the key is claimed) and unknown members or entries
(:class:`Unkept`: the claim rolls back), so a corrected request may reuse the key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flask import Response, g, jsonify, request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from portal.api.schema import Obj, Str
from portal.core.db import begin_write, get_session
from portal.core.errors import problem
from portal.services import idempotency

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_LENGTH = 255
PROBLEM_MEDIA = "application/problem+json"

# What key_or_problem accepts: printable ASCII, not blank, not the empty string "" quoted.
KEY_PATTERN = r'(?! *"" *$)[ -~]*[!-~][ -~]*'
KeyHeaders = Obj({HEADER: Str(
    min_length=1, max_length=MAX_LENGTH, example="order-1042-earn", pattern=KEY_PATTERN,
    description="Unique per intended write (a UUID, or the order number and the operation). "
    "Same key and same body: the original answer is replayed with Idempotent-Replayed: true; "
    "same key and another body: 422.")}, required=(HEADER,), name="IdempotencyHeaders")

Outcome = tuple[int, dict[str, Any]]


class Unkept(Exception):
    """Raised by a write to answer without keeping the answer (an unknown member or entry):
    the key's claim rolls back with everything else, so the key stays free."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def key_or_problem() -> str | Response:
    """The request's key, or the 400 problem to answer. A structured-field string
    (``"abc"``, as the IETF draft writes it) and a bare token (``abc``) are the same key."""
    raw = request.headers.get(HEADER, "").strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw = raw[1:-1]
    if not raw:
        return problem(400, "idempotency-key-missing", "An Idempotency-Key header is required.",
                       "Send a key unique to this write, e.g. a UUID; retries send the same one.",
                       errors=[{"field": HEADER, "code": "required", "message": "is required"}])
    if len(raw) > MAX_LENGTH or not raw.isprintable() or not raw.isascii():
        return problem(400, "idempotency-key-invalid", "The Idempotency-Key is not usable.",
                       f"Use at most {MAX_LENGTH} printable ASCII characters.",
                       errors=[{"field": HEADER, "code": "invalid",
                                "message": f"at most {MAX_LENGTH} printable ASCII characters"}])
    return raw


def outcome_of(response: Response) -> Outcome:
    """A problem response (from :mod:`portal.api.core`) as a status and body to keep."""
    return response.status_code, dict(response.get_json())


def _answer(status: int, body: dict[str, Any], replayed: bool) -> Response:
    response = jsonify(body)
    response.status_code = status
    if status >= 400:
        response.mimetype = PROBLEM_MEDIA
    if replayed:
        response.headers[REPLAYED] = "true"
    return response


def _fingerprint() -> str:
    body = idempotency.canonical_json(json.loads(request.get_data(cache=True)))
    return idempotency.fingerprint(request.method, request.path, body)


def run_once(key: str, write: Callable[[Session], Outcome]) -> Response:
    """Answer with ``write``'s outcome, or with the outcome kept for this key.

    The key is claimed first, without looking: a new key (the common case) costs one insert.
    When it was taken, the transaction rolls back and the kept answer is read instead; on
    PostgreSQL a concurrent request with the same key waits on the unique index until the
    first commits, then lands here and replays it.
    """
    actor, print_ = str(g.api_key.id), _fingerprint()
    session = get_session()
    for attempt in range(2):
        try:
            with begin_write(session):
                if attempt:
                    kept = idempotency.replay(session, actor, key, print_)
                    if kept is not None:
                        return _answer(kept.status, kept.body, replayed=True)
                record = idempotency.claim(session, actor, key, print_)
                status, body = write(session)
                idempotency.settle(session, record, status, body)
            return _answer(status, body, replayed=False)
        except Unkept as exc:
            return exc.response
        except idempotency.IdempotencyConflict as exc:
            return problem(422, "idempotency-key-reused", "This Idempotency-Key was used for "
                           "another request.", str(exc),
                           errors=[{"field": HEADER, "code": "reused", "message": str(exc)}])
        except IntegrityError:
            if attempt:
                raise
    raise AssertionError("unreachable")
