"""CSRF for every form, security headers for every answer."""

from __future__ import annotations

from flask import Flask, Response, g, request
from flask_wtf.csrf import CSRFProtect

csrf = CSRFProtect()

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; worker-src 'self'; manifest-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)

# Pages about one person whoever asks (sign-in links, unsubscribe, the account's own pages).
PRIVATE_PATHS = ("/account", "/preferences", "/loyalty", "/privacy", "/m/", "/u/",
                 "/confirm/", "/verify/", "/reset/")
# The only API answers that are the same for every caller, and may be kept by shared caches.
PUBLIC_API_PATHS = ("/api/v1/openapi.json", "/api/docs")


def is_personal(response: Response) -> bool:
    """Whether ``response`` may carry someone's personal data, so that no cache (a shared
    proxy, the browser's back button on a shared computer) may keep it: every page rendered
    while a customer is signed in, every page under the account's own paths, and every API
    answer but the published reference."""
    path = request.path
    if path.startswith("/api/"):
        return path not in PUBLIC_API_PATHS
    if request.endpoint == "static":
        return False
    return g.get("customer") is not None or path.startswith(PRIVATE_PATHS)


def init_app(app: Flask) -> None:
    csrf.init_app(app)

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Permissions-Policy", "camera=(), microphone=(), "
                                    "geolocation=()")
        if is_personal(response) and "no-store" not in response.headers.get("Cache-Control", ""):
            response.headers["Cache-Control"] = "no-store"
        if app.config["SESSION_COOKIE_SECURE"]:
            response.headers.setdefault("Strict-Transport-Security",
                                        "max-age=31536000; includeSubDomains")
        return response
