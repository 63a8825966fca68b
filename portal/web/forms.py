"""Portal forms. Labels and messages are lazily translated."""

from __future__ import annotations

from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import BooleanField, EmailField, PasswordField, StringField, TextAreaField
from wtforms.validators import DataRequired, Email, EqualTo, Length, Optional

_required = DataRequired(message=_l("This field is required."))
_email = Email(message=_l("Enter a valid email address."))
_password_len = Length(min=10, max=256, message=_l("Use between 10 and 256 characters."))


class SignupForm(FlaskForm):
    email = EmailField(_l("Email address"), [_required, _email, Length(max=320)])
    password = PasswordField(_l("Password"), [_required, _password_len])
    confirm = PasswordField(_l("Repeat the password"),
                            [_required, EqualTo("password", message=_l("Passwords differ."))])


class LoginForm(FlaskForm):
    email = EmailField(_l("Email address"), [_required, Length(max=320)])
    password = PasswordField(_l("Password"), [_required, Length(max=256)])


class EmailOnlyForm(FlaskForm):
    email = EmailField(_l("Email address"), [_required, _email, Length(max=320)])


class ResetForm(FlaskForm):
    password = PasswordField(_l("New password"), [_required, _password_len])
    confirm = PasswordField(_l("Repeat the password"),
                            [_required, EqualTo("password", message=_l("Passwords differ."))])


class ChangeEmailForm(FlaskForm):
    email = EmailField(_l("New email address"), [_required, _email, Length(max=320)])
    current_password = PasswordField(_l("Current password"), [Optional(), Length(max=256)])


class ChangePasswordForm(FlaskForm):
    current_password = PasswordField(_l("Current password"), [Optional(), Length(max=256)])
    password = PasswordField(_l("New password"), [_required, _password_len])
    confirm = PasswordField(_l("Repeat the password"),
                            [_required, EqualTo("password", message=_l("Passwords differ."))])


class DeleteForm(FlaskForm):
    current_password = PasswordField(_l("Current password"), [Optional(), Length(max=256)])
    confirm = BooleanField(_l("I understand that my account and data will be erased."),
                           [DataRequired(message=_l("Tick the box to confirm."))])


class ExportForm(FlaskForm):
    export_password = PasswordField(_l("Current password"), [Optional(), Length(max=256)])


class ContactForm(FlaskForm):
    phone = StringField(_l("Mobile phone"), [Optional(), Length(max=32)])
    postal_address = TextAreaField(_l("Postal address"), [Optional(), Length(max=500)])


class PlainForm(FlaskForm):
    """A form with nothing but its CSRF token (buttons, dynamic fields read by the view)."""
