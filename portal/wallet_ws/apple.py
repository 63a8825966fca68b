"""The PassKit web service, under the card's ``webServiceURL`` (``/wallet/apple``).

Devices call it without cookies or forms, so it is exempt from CSRF and authenticates with the
card's own token (``Authorization: ApplePass <token>``). Every path segment and body is checked
before it reaches the database: a malformed request gets 400, an unknown pass type or serial
404, a wrong token 401.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from typing import Any, Final

from flask import Blueprint, Response, abort, jsonify, request

from portal.core import ratelimit
from portal.core.db import get_session
from portal.core.errors import problem
from portal.loyalty.models import Member
from portal.loyalty.views import current_program
from portal.models.wallet import ApplePass
from portal.services import wallet_apple
from portal.wallet_ws.issuer import apple_wallet
from portal.web import transaction

bp = Blueprint("wallet_apple_ws", __name__, url_prefix="/wallet/apple")
log = logging.getLogger("carnet.wallet.apple.device")

DEVICE_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
PASS_TYPE_RE: Final = re.compile(r"pass\.[A-Za-z0-9.-]{1,200}")
SERIAL_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
PUSH_TOKEN_RE: Final = re.compile(r"[0-9A-Fa-f]{16,200}")
TOKEN_RE: Final = re.compile(r"[\x21-\x7e]{16,200}")
MAX_LOG_LINES: Final = 50
MAX_LOG_LINE_CHARS: Final = 500
MAX_LOG_BODY_BYTES: Final = 64 * 1024


def _check(pattern: re.Pattern[str], value: str) -> str:
    if not pattern.fullmatch(value):
        abort(400)
    return value


def _pass_type(value: str) -> None:
    _check(PASS_TYPE_RE, value)
    if value != apple_wallet().pass_type_id:
        abort(404)


def _token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme != "ApplePass" or not TOKEN_RE.fullmatch(token.strip()):
        return None
    return token.strip()


def _authorized_pass(pass_type: str, serial: str) -> ApplePass:
    """The card named in the path, if the request carries its token (404 / 401 otherwise)."""
    _pass_type(pass_type)
    _check(SERIAL_RE, serial)
    apple_pass = wallet_apple.find_by_serial(get_session(), serial)
    if apple_pass is None:
        abort(404)
    token = _token()
    if token is None or not wallet_apple.token_matches(apple_pass, token):
        abort(401)
    return apple_pass


def _json_object() -> dict[str, Any]:
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # "[[[[…" nested past the stack; silent only covers ValueError
        abort(400)
    if not isinstance(body, dict):
        abort(400)
    return body


@bp.post("/v1/devices/<device>/registrations/<pass_type>/<serial>")
def register(device: str, pass_type: str, serial: str) -> tuple[str, int]:
    _check(DEVICE_RE, device)
    apple_pass = _authorized_pass(pass_type, serial)
    push_token = _json_object().get("pushToken")
    if not isinstance(push_token, str) or not PUSH_TOKEN_RE.fullmatch(push_token):
        abort(400)
    db = get_session()
    with transaction(db):
        created = wallet_apple.register_device(db, apple_pass, device, push_token)
    return "", 201 if created else 200


@bp.delete("/v1/devices/<device>/registrations/<pass_type>/<serial>")
def unregister(device: str, pass_type: str, serial: str) -> tuple[str, int]:
    _check(DEVICE_RE, device)
    apple_pass = _authorized_pass(pass_type, serial)
    db = get_session()
    with transaction(db):
        wallet_apple.unregister_device(db, apple_pass, device)
    return "", 200


@bp.get("/v1/devices/<device>/registrations/<pass_type>")
def updated_serials(device: str, pass_type: str) -> Response | tuple[str, int]:
    _check(DEVICE_RE, device)
    _pass_type(pass_type)
    try:
        found = wallet_apple.serials_updated_since(
            get_session(), device, request.args.get("passesUpdatedSince"))
    except wallet_apple.PassTagError:
        abort(400)
    if found is None:
        return "", 204
    serials, last_updated = found
    return jsonify({"serialNumbers": serials, "lastUpdated": last_updated})


@bp.get("/v1/passes/<pass_type>/<serial>")
def latest_pass(pass_type: str, serial: str) -> Response:
    apple_pass = _authorized_pass(pass_type, serial)
    modified = wallet_apple.last_modified(apple_pass)
    since = request.if_modified_since
    if since is not None and modified <= since:
        response = Response(status=304)
        response.last_modified = modified
        return response
    program = current_program()
    db = get_session()
    member = db.get(Member, apple_pass.member_id)
    wallet = apple_wallet()
    if program is None or member is None or not wallet.available:
        abort(404)
    data, apple_pass = wallet_apple.build_pkpass(
        db, member, wallet.card_settings(program), wallet.credentials())
    response = Response(data, mimetype="application/vnd.apple.pkpass")
    response.last_modified = wallet_apple.last_modified(apple_pass)
    response.headers["Cache-Control"] = "no-cache"
    return response


def _printable(line: str) -> str:
    """One log line as text that cannot pass for another: every control, format, surrogate or
    line/paragraph separator character (``\\n``, ``\\r``, ESC, U+202E, U+2028…) is written as
    its ``\\uXXXX`` escape, so a device (or anyone posting here) cannot start a forged line,
    colour a terminal or reverse text. Cut to :data:`MAX_LOG_LINE_CHARS` first."""
    out = []
    for char in line[:MAX_LOG_LINE_CHARS]:
        if unicodedata.category(char)[0] == "C" or unicodedata.category(char) in ("Zl", "Zp"):
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out)


@bp.post("/v1/log")
def device_log() -> Response | tuple[str, int]:
    """Apple's devices post their web-service errors here, without credentials: anyone can.
    Counted per address (``DEVICE_LOG_RATE_LIMIT``, 429 beyond), the body capped, and each
    line escaped and cut before it reaches the log. A well-formed body is answered 200."""
    wait = ratelimit.hit("device_log", request.remote_addr or "-")
    if wait:
        response = problem(429, "rate-limited", "Too many requests.",
                           f"Retry after {wait} seconds.")
        response.headers["Retry-After"] = str(wait)
        return response
    request.max_content_length = MAX_LOG_BODY_BYTES
    logs = _json_object().get("logs")
    if not isinstance(logs, list) or not all(isinstance(line, str) for line in logs):
        abort(400)
    for line in logs[:MAX_LOG_LINES]:
        log.info("device: %s", _printable(line))
    if len(logs) > MAX_LOG_LINES:
        log.info("device: %d more lines not logged", len(logs) - MAX_LOG_LINES)
    return "", 200
