"""Delivering email: SMTP when configured, otherwise (development only, see
:func:`portal.core.config.load`) ``.eml`` files in an outbox folder so a local run needs no mail
server. Rendering (templates, locale) happens in the web layer.

Nothing here logs an address, a subject or a link: emails carry sign-in and reset links, and
logs travel further than mailboxes (collectors, support tickets, backups)."""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

log = logging.getLogger("carnet.mail")


class Transport(Protocol):
    local: bool  # True: delivering is a quick local write, not a network round trip

    def send(self, message: EmailMessage) -> None: ...


class OutboxTransport:
    local = True

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def send(self, message: EmailMessage) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        safe_to = re.sub(r"[^a-zA-Z0-9@._-]", "_", str(message["To"]))
        stamp = str(message["Message-ID"]).strip("<>").split("@")[0]
        path = self.folder / f"{stamp}-{safe_to}.eml"
        path.write_bytes(bytes(message))
        # The folder only: the file name holds the address, the file itself the link.
        log.info("an email was written to the outbox folder %s", self.folder)


class SMTPTransport:
    local = False

    def __init__(self, url: str, timeout: float = 15.0) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in {"smtp", "smtps", "smtp+starttls"}:
            raise ValueError("CARNET_SMTP_URL must start with smtp://, smtps:// or "
                             "smtp+starttls://")
        self.scheme = parsed.scheme
        self.host = parsed.hostname or "localhost"
        self.port = parsed.port or (465 if parsed.scheme == "smtps" else 25)
        self.username = unquote(parsed.username) if parsed.username else None
        self.password = unquote(parsed.password) if parsed.password else None
        self.timeout = timeout

    def send(self, message: EmailMessage) -> None:
        smtp: smtplib.SMTP
        if self.scheme == "smtps":
            smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout,
                                    context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        with smtp:
            if self.scheme == "smtp+starttls":
                smtp.starttls(context=ssl.create_default_context())
            if self.username:
                smtp.login(self.username, self.password or "")
            smtp.send_message(message)


def make_transport(smtp_url: str | None, outbox: Path) -> Transport:
    return SMTPTransport(smtp_url) if smtp_url else OutboxTransport(outbox)
