"""Localized text for service error codes."""

from __future__ import annotations

from flask_babel import gettext as _


def account_error(code: str) -> str:
    messages = {
        "invalid_email": _("Enter a valid email address."),
        "email_taken": _("This email address cannot be used."),
        "email_lookalike": _("An account with a similar-looking address already exists. "
                             "Check that you typed your address with ordinary letters, or "
                             "sign in with the address you already use."),
        "same_email": _("This is already your email address."),
        "invalid_phone": _("Enter a valid mobile number, with its country code (e.g. "
                           "+33 6 12 34 56 78)."),
        "phone_taken": _("This phone number cannot be used."),
        "password_too_short": _("Use at least 10 characters."),
        "password_too_long": _("Use at most 256 characters."),
        "password_is_email": _("Your password cannot be your email address."),
        "address_too_long": _("The address is too long."),
        "invalid_timezone": _("Choose a time zone from the list."),
        "invalid_cap": _("Choose a number between 1 and 100, or leave it empty for no limit."),
        "incomplete_quiet_hours": _("Give both the start and the end of quiet hours."),
        "invalid_time": _("Enter a time as HH:MM."),
        "stale_link": _("This link is no longer valid."),
    }
    return messages.get(code, _("This value is not valid."))
