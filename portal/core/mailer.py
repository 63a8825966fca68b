"""Rendering emails in the recipient's language and handing them to the transport."""

from __future__ import annotations

import logging
import uuid
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any

from flask import Flask, Response, after_this_request, current_app, render_template
from flask_babel import force_locale

from portal.core.mail import make_transport

log = logging.getLogger("carnet.mail")


def init_app(app: Flask) -> None:
    app.extensions["carnet.mail"] = make_transport(
        app.config.get("SMTP_URL"), Path(app.instance_path) / "outbox"
    )


def send(
    to: str,
    template: str,
    locale: str | None,
    *,
    unsubscribe: dict[str, str] | None = None,
    **context: Any,
) -> EmailMessage:
    """Render ``templates/email/<template>.{txt,html}`` in ``locale`` and send it.

    ``unsubscribe`` carries the ``List-Unsubscribe`` headers (RFC 8058) for marketing mail.
    """
    message = render(to, template, locale, unsubscribe=unsubscribe, **context)
    deliver(message)
    return message


def render(
    to: str,
    template: str,
    locale: str | None,
    *,
    unsubscribe: dict[str, str] | None = None,
    **context: Any,
) -> EmailMessage:
    """The message :func:`send` would send, not sent."""
    with force_locale(locale or "en"):
        subject = render_template(f"email/{template}.subject.txt", **context).strip()
        text = render_template(f"email/{template}.txt", **context)
        html = render_template(f"email/{template}.html", **context)
    message = EmailMessage()
    message["Subject"] = subject.replace("\r", " ").replace("\n", " ")
    message["From"] = current_app.config["MAIL_FROM"]
    message["To"] = to
    message["Date"] = formatdate(localtime=False)
    domain = current_app.config["MAIL_FROM"].rsplit("@", 1)[-1].strip(">") or "carnet.local"
    message["Message-ID"] = f"<{uuid.uuid4().hex}@{domain}>"
    if unsubscribe:
        for name, value in unsubscribe.items():
            message[name] = value
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    # After the body: set_content() drops every Content-* header set before it.
    message["Content-Language"] = locale or "en"
    return message


def deliver(message: EmailMessage, *, after_response: bool = False) -> None:
    """Hand ``message`` to the transport.

    ``after_response``: when the transport is remote (SMTP), deliver once the answer has been
    sent, so that its round trip does not show in the answer time (pages that must not reveal
    whether an address has an account). The local outbox is written at once either way.
    """
    transport = current_app.extensions["carnet.mail"]
    if not after_response or getattr(transport, "local", False):
        transport.send(message)
        return

    def _later(response: Response) -> Response:
        response.call_on_close(lambda: _deliver_logged(transport, message))
        return response

    after_this_request(_later)


def _deliver_logged(transport: Any, message: EmailMessage) -> None:
    try:
        transport.send(message)
    except Exception:  # the answer is gone: all that is left to do is to say so in the log
        # Never the address: the message id is enough to find it in the mail server's logs.
        log.exception("could not deliver the email %s", message["Message-ID"])
