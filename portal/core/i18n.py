"""Locale selection: the customer's saved choice, then the switcher, then Accept-Language
negotiated with Babel (so ``fr-CA`` finds French)."""

from __future__ import annotations

from babel import negotiate_locale
from flask import Flask, g, request, session
from flask_babel import Babel

LOCALES = ("en", "fr")


def negotiate(accept_language_values: list[str]) -> str:
    preferred = [value.replace("-", "_") for value in accept_language_values]
    return negotiate_locale(preferred, list(LOCALES)) or "en"


def select_locale() -> str:
    customer = g.get("customer")
    if customer is not None and customer.locale in LOCALES:
        return str(customer.locale)
    chosen = session.get("locale")
    if chosen in LOCALES:
        return str(chosen)
    return negotiate([value for value, _ in request.accept_languages])


def select_timezone() -> str | None:
    customer = g.get("customer")
    if customer is not None and customer.timezone:
        return str(customer.timezone)
    return None


def init_app(app: Flask) -> None:
    from flask_babel import get_locale

    app.config.setdefault("BABEL_DEFAULT_TIMEZONE", app.config["DEFAULT_TIMEZONE"])
    Babel(app, locale_selector=select_locale, timezone_selector=select_timezone)
    app.jinja_env.globals.update(LOCALES=LOCALES,
                                 LOCALE_NAMES={"en": "English", "fr": "Français"},
                                 current_locale=lambda: str(get_locale() or "en"))
