"""Helpers for API tests: keys made through the app's own session, JSON calls with a key."""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from portal.core.db import new_session
from portal.models.customer import Customer
from portal.services import api_keys
from portal.services.accounts import create_customer
from portal.services.catalog import get_catalog
from portal.services.consent import Proof, record_consent

ALL = api_keys.SCOPES


def make_key(app: Flask, *scopes: str, name: str | None = None) -> str:
    session = new_session(app)
    with session.begin():
        made = api_keys.create_key(
            session, name or f"key-{'-'.join(scopes)}-{id(scopes)}", list(scopes or ALL)
        )
    session.close()
    return made.secret


class Api:
    def __init__(self, app: Flask, client: FlaskClient, key: str | None = None) -> None:
        self.app, self.client = app, client
        self.key = key if key is not None else make_key(app, *ALL, name="all-scopes")

    def headers(self, key: str | None = None, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}", **extra}

    def call(
        self, method: str, path: str, json: Any = None, key: str | None = None, **kw: Any
    ) -> Any:
        headers = self.headers(key, **kw.pop("headers", {}))
        return self.client.open("/api/v1" + path, method=method, json=json, headers=headers, **kw)

    def get(self, path: str, **kw: Any) -> Any:
        return self.call("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.call("POST", path, json, **kw)

    def put(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.call("PUT", path, json, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.call("DELETE", path, **kw)

    def customer(self, email: str | None = None, **fields: Any) -> Customer:
        session = new_session(self.app)
        with session.begin():
            c = create_customer(session, email, **fields)
        session.close()
        return c

    def consent(
        self, customer: Customer, topic: str, channel: str, state: str, source: str = "portal"
    ) -> None:
        session = new_session(self.app)
        with session.begin():
            c = session.scalars(select(Customer).where(Customer.id == customer.id)).one()
            record_consent(
                session,
                c,
                topic,
                channel,
                state,
                Proof(source, "test"),
                catalog=get_catalog(session),
            )
        session.close()

    def add(self, *rows: Any) -> None:
        session = new_session(self.app)
        with session.begin():
            for row in rows:
                session.add(row)
        session.close()


def field_errors(response: Any) -> dict[str, str]:
    body = response.get_json()
    return {e["field"]: e["code"] for e in body.get("errors", [])}
