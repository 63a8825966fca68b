"""Security headers, session cookie flags, CSRF, production start-up checks, error pages."""

from __future__ import annotations

import pytest

from portal import create_app
from portal.services import accounts
from tests.conftest import app_config, submit

PASSWORD = "correct horse 1"

HTML_PAGES = ["/", "/signup", "/login", "/forgot", "/link", "/no-such-page", "/m/bad-token",
              "/u/bad-token", "/confirm/bad-token", "/reset/bad-token"]


def assert_security_headers(response):
    csp = response.headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in csp
    assert "'unsafe-eval'" not in csp
    assert "frame-ancestors 'none'" in csp
    assert "default-src 'self'" in csp
    assert response.headers["Referrer-Policy"] in ("same-origin", "no-referrer",
                                                   "strict-origin-when-cross-origin")
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("path", HTML_PAGES)
def test_every_html_answer_carries_security_headers(client, path):
    r = client.get(path)
    assert r.mimetype == "text/html"
    assert_security_headers(r)


def test_signed_in_pages_and_error_pages_carry_security_headers(client, session):
    accounts.create_customer(session, "ann@example.com", password=PASSWORD)
    session.commit()
    r = submit(client, "/login", {"email": "ann@example.com", "password": PASSWORD})
    assert_security_headers(r)
    for path in ("/preferences", "/preferences/history", "/account", "/account/delete"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert_security_headers(r)
    r = client.post("/preferences", data={})  # no CSRF token
    assert_security_headers(r)


def test_no_inline_script_in_pages(client, session):
    for path in ("/", "/signup", "/login"):
        html = client.get(path).get_data(as_text=True)
        assert "<script>" not in html
        assert " onclick=" not in html and " onload=" not in html


def test_session_cookie_is_httponly_and_lax(client):
    r = client.get("/signup")
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("carnet_session=")
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # development over plain http


def test_session_cookie_is_secure_in_production(connection, tmp_path):
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection, ENV="production",
                                TESTING=False, SECRET_KEY="a-real-production-secret-0123456789",
                                SMTP_URL="smtp://127.0.0.1:2525"))
    r = app.test_client().get("/signup")
    cookie = r.headers["Set-Cookie"]
    assert "Secure" in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "max-age=" in r.headers["Strict-Transport-Security"]


def test_post_without_csrf_token_gets_a_friendly_400(client):
    r = client.post("/signup", data={"email": "ann@example.com", "password": PASSWORD,
                                     "confirm": PASSWORD})
    assert r.status_code == 400
    html = r.get_data(as_text=True)
    assert "This form expired or was sent from elsewhere" in html
    assert "Traceback" not in html


def test_post_with_a_forged_csrf_token_is_refused(client):
    client.get("/signup")
    r = client.post("/signup", data={"csrf_token": "forged", "email": "ann@example.com",
                                     "password": PASSWORD, "confirm": PASSWORD})
    assert r.status_code == 400


def test_production_without_secret_key_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.delenv("CARNET_SECRET_KEY", raising=False)
    monkeypatch.delenv("CARNET_ENV", raising=False)
    config = app_config(tmp_path, ENV="production", TESTING=False)
    del config["SECRET_KEY"]
    with pytest.raises(RuntimeError, match="SECRET_KEY"):
        create_app(config)
    assert not (tmp_path / "instance" / "secret_key").exists()


def test_production_without_a_mail_server_refuses_to_start(tmp_path, monkeypatch, connection):
    """Without SMTP, emails (and their sign-in and reset links) would be files on the server
    and lines in its log: outside development Carnet does not start that way."""
    monkeypatch.delenv("CARNET_SMTP_URL", raising=False)
    monkeypatch.delenv("CARNET_ENV", raising=False)
    config = app_config(tmp_path, CARNET_DB_BIND=connection, ENV="production", TESTING=False,
                        SECRET_KEY="a-real-production-secret-0123456789")
    with pytest.raises(RuntimeError, match="CARNET_SMTP_URL is not set"):
        create_app(config)
    app = create_app({**config, "SMTP_URL": "smtps://user:pass@mail.example:465"})
    assert app.test_client().get("/login").status_code == 200
    assert not getattr(app.extensions["carnet.mail"], "local", True)


def test_no_demo_customer_outside_development(connection, tmp_path, session):
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection, ENV="production",
                                TESTING=False, SECRET_KEY="a-real-production-secret-0123456789",
                                SMTP_URL="smtp://127.0.0.1:2525"))
    with app.app_context():  # as `flask --app app demo` runs it
        result = app.test_cli_runner().invoke(args=["demo"])
    assert result.exit_code != 0
    assert "development only" in result.output and "Password" not in result.output
    assert accounts.find_by_email(session, "demo@example.com") is None


def test_development_without_secret_key_generates_one(tmp_path, monkeypatch, connection):
    monkeypatch.delenv("CARNET_SECRET_KEY", raising=False)
    monkeypatch.delenv("CARNET_ENV", raising=False)
    config = app_config(tmp_path, CARNET_DB_BIND=connection)
    del config["SECRET_KEY"]
    first = create_app(config)
    second = create_app(config)
    assert first.config["SECRET_KEY"] == second.config["SECRET_KEY"]
    assert len(first.config["SECRET_KEY"]) >= 32


def test_404_page_is_localized(client):
    english = client.get("/no-such-page")
    assert english.status_code == 404
    assert "This page does not exist." in english.get_data(as_text=True)
    french = client.get("/no-such-page", headers={"Accept-Language": "fr"})
    assert french.status_code == 404
    html = french.get_data(as_text=True)
    assert '<html lang="fr">' in html
    assert "Cette page n’existe pas." in html


def test_unexpected_errors_show_no_stack_trace(app, client):
    @app.get("/boom-for-test")
    def boom():
        raise RuntimeError("secret internals")

    r = client.get("/boom-for-test")
    assert r.status_code == 500
    html = r.get_data(as_text=True)
    assert "secret internals" not in html
    assert "Something went wrong on our side" in html
    assert_security_headers(r)
