"""Absolute links for emails, signed with the app's secret."""

from __future__ import annotations

from typing import Any

from flask import current_app, url_for

from portal.core import tokens
from portal.models.customer import Customer


def token(purpose: str, payload: dict[str, Any]) -> str:
    return tokens.make_token(current_app.config["SECRET_KEY"], purpose, payload)


# Purposes whose lifetime a deployment may choose, in days.
CONFIGURED_AGES = {"manage": "LINK_MAX_AGE_DAYS", "unsubscribe": "UNSUBSCRIBE_MAX_AGE_DAYS"}


def read(purpose: str, value: str, max_age: int | None = None) -> dict[str, Any]:
    if max_age is None and purpose in CONFIGURED_AGES:
        max_age = int(current_app.config[CONFIGURED_AGES[purpose]]) * 24 * 3600
    return tokens.read_token(current_app.config["SECRET_KEY"], purpose, value, max_age)


def external(endpoint: str, **values: Any) -> str:
    base = current_app.config["BASE_URL"].rstrip("/")
    return base + url_for(endpoint, **values)


def manage_link(customer: Customer) -> str:
    return external("account.magic", token=token(
        "manage", {"c": customer.public_id, "e": customer.auth_epoch}))


def unsubscribe_link(customer: Customer, topic: str, channel: str) -> str:
    return external("unsubscribe.page", token=token(
        "unsubscribe", {"c": customer.public_id, "t": topic, "ch": channel}))


def unsubscribe_headers(customer: Customer, topic: str, channel: str) -> dict[str, str]:
    """RFC 8058 headers for a marketing message."""
    return {
        "List-Unsubscribe": f"<{unsubscribe_link(customer, topic, channel)}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
