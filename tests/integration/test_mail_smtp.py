"""Email through a real SMTP server (aiosmtpd on the loopback interface)."""

from __future__ import annotations

import re
import socket
from email import message_from_bytes, policy

import pytest
from aiosmtpd.controller import Controller

from portal import create_app
from tests.conftest import app_config, path_of, submit

PASSWORD = "correct horse 1"


class Collector:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted for delivery"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp_server():
    collector = Collector()
    controller = Controller(collector, hostname="127.0.0.1", port=free_port())
    controller.start()  # returns once the server answers
    yield controller, collector
    controller.stop()


def test_signup_email_goes_through_smtp(smtp_server, connection, tmp_path):
    controller, collector = smtp_server
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection,
                                SMTP_URL=f"smtp://127.0.0.1:{controller.port}"))
    client = app.test_client()
    r = submit(client, "/signup", {"email": "ann@example.com", "password": PASSWORD,
                                   "confirm": PASSWORD})
    assert r.status_code == 200
    assert not (tmp_path / "instance" / "outbox").exists()

    assert len(collector.messages) == 1
    mail_from, rcpt_tos, content = collector.messages[0]
    assert rcpt_tos == ["ann@example.com"]
    assert mail_from == "no-reply@carnet.example"
    message = message_from_bytes(content, policy=policy.default)
    assert message["To"] == "ann@example.com"
    assert message["Subject"] == "Confirm your email address"
    body = message.get_body(preferencelist=("plain",)).get_content()
    link = re.search(r"http://localhost/verify/\S+", body).group(0)
    html = message.get_body(preferencelist=("html",)).get_content()
    assert link in html

    r = client.get(path_of(link))
    assert r.status_code == 302
    assert client.get("/preferences").status_code == 200


def no_secrets_in(records, *secrets: str) -> None:
    for record in records:
        line = record.getMessage() + (record.exc_text or "")
        assert "http://" not in line and "https://" not in line, line
        for secret in secrets:
            assert secret not in line, line


def test_the_local_outbox_logs_no_address_and_no_link(client, outbox, caplog):
    """Development writes emails to instance/outbox/: the files hold the links, the log only
    says that a file was written."""
    caplog.set_level("DEBUG")
    submit(client, "/signup", {"email": "ann@example.com", "password": PASSWORD,
                               "confirm": PASSWORD})
    submit(client, "/link", {"email": "ann@example.com"})
    assert "/m/" in outbox.link("ann@example.com", "/m/")   # the link is in the file
    assert len(outbox.messages()) == 2
    assert caplog.records, "writing to the outbox is still logged"
    no_secrets_in(caplog.records, "ann@example.com", "ann_example.com")


def test_an_email_that_cannot_be_delivered_is_logged_without_its_address(
        connection, tmp_path, caplog, session):
    """Link pages deliver after the answer; a failure is logged, never who it was for."""
    from portal.services import accounts

    accounts.create_customer(session, "ann@example.com", password=PASSWORD)
    session.commit()
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection,
                                SMTP_URL=f"smtp://127.0.0.1:{free_port()}"))  # nobody there
    client = app.test_client()
    caplog.set_level("DEBUG")
    response = submit(client, "/link", {"email": "ann@example.com"})
    assert response.status_code == 200
    response.close()  # the WSGI server's cue: the delivery runs (and fails) now
    assert any("could not deliver" in r.getMessage() for r in caplog.records)
    no_secrets_in(caplog.records, "ann@example.com")
