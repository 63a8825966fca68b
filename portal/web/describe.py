"""Sentences for the consent history, in the reader's language."""

from __future__ import annotations

from flask_babel import format_date
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l

from portal.models.consent import ANY, ConsentEvent
from portal.services.catalog import Catalog

CHANNEL_LABELS = {
    "email": _l("Email"),
    "sms": _l("SMS"),
    "voice": _l("Phone calls"),
    "postal": _l("Post"),
    "app_push": _l("App notifications"),
    "web_push": _l("Browser notifications"),
    "wallet": _l("Wallet card"),
}


def channel_label(channel: str) -> str:
    return str(CHANNEL_LABELS.get(channel, channel))


def source_phrase(source: str) -> str:
    phrases = {
        "portal": _("on your preferences page"),
        "link": _("from a link in an email"),
        "one_click": _("with one click from your mailbox"),
        "double_opt_in": _("by confirming by email"),
        "api": _("through one of our services"),
        "import": _("when your account was imported"),
        "sms": _("by text message"),
        "call_center": _("with our customer service"),
        "store": _("in a store"),
        "paper": _("on a paper form"),
        "merge": _("when two of your records were merged"),
        "web_push": _("in your browser"),
        "loyalty": _("when joining the loyalty programme"),
        "system": _("automatically"),
    }
    return phrases.get(source, source)


def describe(event: ConsentEvent, catalog: Catalog, locale: str) -> str:
    date = format_date(event.occurred_at, "long")
    how = source_phrase(event.source)
    channel = channel_label(event.channel)
    if event.topic_key == ANY and event.channel == ANY:
        if event.state == "withdrawn":
            return _("On %(date)s you paused all marketing messages (%(how)s).", date=date,
                     how=how)
        return _("On %(date)s you resumed marketing messages (%(how)s).", date=date, how=how)
    if event.topic_key == ANY:
        if event.state == "withdrawn":
            return _("On %(date)s you switched off everything by %(channel)s (%(how)s).",
                     date=date, channel=channel, how=how)
        return _("On %(date)s you switched %(channel)s back on (%(how)s).", date=date,
                 channel=channel, how=how)
    topic = catalog.get(event.topic_key)
    name = topic.name(locale) if topic else event.topic_key
    if event.channel == ANY:
        channel = _("every channel")
    if event.state == "granted":
        return _("On %(date)s you agreed to %(topic)s by %(channel)s (%(how)s).", date=date,
                 topic=name, channel=channel, how=how)
    if event.state == "pending":
        return _("On %(date)s you asked for %(topic)s by %(channel)s, to be confirmed by email "
                 "(%(how)s).", date=date, topic=name, channel=channel, how=how)
    return _("On %(date)s you withdrew %(topic)s by %(channel)s (%(how)s).", date=date,
             topic=name, channel=channel, how=how)
