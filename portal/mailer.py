"""Rendering emails in the recipient's language and handing them to the transport."""

from __future__ import annotations

import uuid
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any

from flask import Flask, current_app, render_template
from flask_babel import force_locale

from portal.services.mail import make_transport


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
    current_app.extensions["carnet.mail"].send(message)
    return message
