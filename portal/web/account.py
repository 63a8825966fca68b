"""Sign up, verification, log in/out, forgotten password, emailed sign-in links, account
settings. Every answer about an address is the same whether or not it has an account."""

from __future__ import annotations

from email.message import EmailMessage

from flask import (
    Blueprint,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_babel import gettext as _
from flask_wtf import FlaskForm
from werkzeug.wrappers import Response

from portal import mailer, ratelimit
from portal.auth import (
    FRESH_LINK_SECONDS,
    current_customer,
    login_required,
    sign_in,
    sign_out,
)
from portal.db import get_session
from portal.i18n import LOCALES
from portal.models.customer import Customer
from portal.services import accounts
from portal.services.accounts import AccountError
from portal.services.tokens import TokenError, fingerprint
from portal.web import links, local_path, transaction
from portal.web.errors_text import account_error
from portal.web.forms import (
    ChangeEmailForm,
    ChangePasswordForm,
    EmailOnlyForm,
    LoginForm,
    PlainForm,
    ResetForm,
    SignupForm,
)

bp = Blueprint("account", __name__)


def _locale() -> str:
    from flask_babel import get_locale

    return str(get_locale() or "en")


def _too_many(template: str, form: FlaskForm, wait: int) -> Response:
    """429 with the form again, and ``Retry-After`` for clients that read it."""
    flash(_("Too many attempts. Try again in %(minutes)s minute(s).",
            minutes=max(1, -(-wait // 60))), "error")
    response = make_response(render_template(template, form=form), 429)
    response.headers["Retry-After"] = str(wait)
    return response


def _safe_next(target: str | None) -> str:
    return local_path(target) or url_for("preferences.page")


@bp.route("/signup", methods=["GET", "POST"])
def signup() -> str | Response | tuple[str, int]:
    form = SignupForm()
    if form.validate_on_submit():
        wait = ratelimit.hit("signup", request.remote_addr or "-")
        if wait:
            return _too_many("account/signup.html", form, wait)
        try:
            with transaction(get_session()):
                result = accounts.signup(get_session(), form.email.data or "",
                                         form.password.data or "", _locale())
        except AccountError as exc:
            getattr(form, exc.field, form.email).errors.append(account_error(exc.code))
            return render_template("account/signup.html", form=form), 422
        customer = result.customer
        if result.created:
            mailer.send(customer.email or "", "verify", customer.locale,
                        link=links.external("account.verify", token=links.token(
                            "verify-email", {"c": customer.public_id, "m": customer.email,
                                             "e": customer.auth_epoch})))
        else:
            mailer.send(customer.email or "", "already_registered", customer.locale,
                        login=links.external("account.login"),
                        forgot=links.external("account.forgot"))
        return render_template("account/check_email.html",
                               message=_("We sent a message to %(email)s. Follow the link in it "
                                         "to confirm your address.",
                                         email=form.email.data))
    return render_template("account/signup.html", form=form), (422 if form.errors else 200)


@bp.get("/verify/<token>")
def verify(token: str) -> str | Response | tuple[str, int]:
    try:
        data = links.read("verify-email", token)
    except TokenError as exc:
        return _bad_link(exc.reason)
    session_db = get_session()
    with transaction(session_db):
        customer = accounts.find_by_public_id(session_db, str(data.get("c")))
        if customer is None or not accounts.mark_email_verified(session_db, customer,
                                                                str(data.get("m"))):
            return _bad_link("invalid")
    if customer.auth_epoch != data.get("e"):
        # The link also signs in, but not once the password changed (e.g. after a reset
        # because someone else had the mailbox): the address is confirmed, nothing more.
        flash(_("Your email address is confirmed. Sign in to continue."), "success")
        return redirect(url_for("account.login"))
    sign_in(customer, "link")
    flash(_("Your email address is confirmed. Welcome!"), "success")
    return redirect(url_for("preferences.page"))


@bp.route("/login", methods=["GET", "POST"])
def login() -> str | Response | tuple[str, int]:
    form = LoginForm()
    if form.validate_on_submit():
        email = accounts.email_key(form.email.data or "")  # one count per address however spelt
        wait = ratelimit.hit("login", f"{email}|{request.remote_addr}")
        if wait:
            return _too_many("account/login.html", form, wait)
        with transaction(get_session()):
            customer = accounts.authenticate(get_session(), email, form.password.data or "")
        if customer is None:
            flash(_("That email and password do not match."), "error")
            return render_template("account/login.html", form=form), 401
        sign_in(customer, "password")
        return redirect(_safe_next(request.args.get("next")))
    return render_template("account/login.html", form=form)


@bp.post("/logout")
def logout() -> Response:
    if PlainForm().validate_on_submit():
        sign_out()
        flash(_("You are signed out."), "success")
    return redirect(url_for("main.index"))


def _link_message(purpose: str, email: str, customer: Customer | None) -> EmailMessage:
    """The email with a reset or sign-in link for ``customer``. Without one (the address has
    no account), the same work on a placeholder, never sent: a miss then costs what a hit
    costs, and the answer time tells nothing about whether the address has an account."""
    locale: str | None
    if customer is None:
        public_id, locale, address = "cus_nobody", _locale(), "nobody@carnet.invalid"
        state: object = fingerprint(None) if purpose == "reset-password" else 0
    else:
        public_id, locale, address = customer.public_id, customer.locale, email
        state = (fingerprint(customer.password_hash) if purpose == "reset-password"
                 else customer.auth_epoch)
    if purpose == "reset-password":
        link = links.external("account.reset", token=links.token(
            "reset-password", {"c": public_id, "f": state}))
        return mailer.render(address, "reset", locale, link=link)
    link = links.external("account.magic", token=links.token("manage", {"c": public_id,
                                                                      "e": state}))
    return mailer.render(address, "manage_link", locale, link=link)


def _send_link_page(
    form: EmailOnlyForm, template: str, purpose: str
) -> str | Response | tuple[str, int]:
    if form.validate_on_submit():
        email = accounts.email_key(form.email.data or "")
        wait = ratelimit.hit("link", email)
        if wait:
            return _too_many(template, form, wait)
        try:
            email = accounts.normalize_email(email)
        except AccountError:
            email = ""
        customer = accounts.find_by_email(get_session(), email) if email else None
        if customer is not None and customer.erased_at is not None:
            customer = None
        message = _link_message(purpose, email, customer)
        if customer is not None:
            # Over SMTP, after the answer: its round trip would tell the address has an account.
            mailer.deliver(message, after_response=True)
        return render_template("account/check_email.html", message=_(
            "If %(email)s has an account, a message with a link is on its way. The link "
            "works for a limited time.", email=form.email.data))
    return render_template(template, form=form), (422 if form.errors else 200)


@bp.route("/forgot", methods=["GET", "POST"])
def forgot() -> str | Response | tuple[str, int]:
    return _send_link_page(EmailOnlyForm(), "account/forgot.html", "reset-password")


@bp.route("/link", methods=["GET", "POST"])
def request_link() -> str | Response | tuple[str, int]:
    return _send_link_page(EmailOnlyForm(), "account/request_link.html", "manage")


@bp.route("/reset/<token>", methods=["GET", "POST"])
def reset(token: str) -> str | Response | tuple[str, int]:
    try:
        data = links.read("reset-password", token)
    except TokenError as exc:
        return _bad_link(exc.reason)
    db = get_session()
    customer = accounts.find_by_public_id(db, str(data.get("c")))
    if customer is None or data.get("f") != fingerprint(customer.password_hash):
        return _bad_link("used")
    form = ResetForm()
    if form.validate_on_submit():
        try:
            with transaction(db):
                accounts.set_password(db, customer, form.password.data or "")
        except AccountError as exc:
            form.password.errors.append(account_error(exc.code))
            return render_template("account/reset.html", form=form), 422
        sign_in(customer, "password")
        flash(_("Your password is changed."), "success")
        return redirect(url_for("preferences.page"))
    return render_template("account/reset.html", form=form), (422 if form.errors else 200)


@bp.get("/m/<token>")
def magic(token: str) -> str | Response | tuple[str, int]:
    try:
        data = links.read("manage", token)
    except TokenError as exc:
        return _bad_link(exc.reason)
    customer = accounts.find_by_public_id(get_session(), str(data.get("c")))
    if customer is None or customer.erased_at is not None or \
            customer.auth_epoch != data.get("e"):
        return _bad_link("invalid")
    sign_in(customer, "link")
    return redirect(url_for("preferences.page"))


def _bad_link(reason: str) -> tuple[str, int]:
    messages = {
        "expired": _("This link has expired. Ask for a new one below."),
        "used": _("This link was already used or is no longer valid. Ask for a new one."),
    }
    message = messages.get(reason, _("This link is not valid. It may have been cut or "
                                     "changed. Ask for a new one below."))
    return render_template("errors/bad_link.html", message=message), 400


def sensitive_allowed(password: str | None) -> bool:
    """Changing email or password or erasing asks for the password or a fresh link."""
    customer = current_customer()
    assert customer is not None
    if password:
        return accounts.verify_password(customer, password)
    import time

    return session.get("method") == "link" and \
        time.time() - float(session.get("at", 0)) < FRESH_LINK_SECONDS


def needs_password_message() -> str:
    return _("Enter your current password, or use a new sign-in link (valid %(minutes)s "
             "minutes) to make this change.", minutes=FRESH_LINK_SECONDS // 60)


@bp.get("/account")
@login_required
def settings() -> str:
    return render_template("account/settings.html", email_form=ChangeEmailForm(),
                           password_form=ChangePasswordForm(), plain=PlainForm(),
                           locales=LOCALES)


@bp.post("/account/email")
@login_required
def change_email() -> str | Response | tuple[str, int]:
    customer = current_customer()
    assert customer is not None
    form = ChangeEmailForm()
    if form.validate_on_submit():
        if not sensitive_allowed(form.current_password.data):
            form.current_password.errors.append(needs_password_message())
        else:
            db = get_session()
            try:
                with transaction(db):
                    new = accounts.request_email_change(db, customer, form.email.data or "")
            except AccountError as exc:
                form.email.errors.append(account_error(exc.code))
            else:
                taken = accounts.find_by_email(db, new) is not None
                if not taken:
                    mailer.send(new, "change_email", customer.locale, link=links.external(
                        "account.confirm_email", token=links.token(
                            "change-email", {"c": customer.public_id, "m": new})))
                flash(_("We sent a confirmation link to %(email)s. Your address changes when "
                        "you follow it.", email=new), "success")
                return redirect(url_for("account.settings"))
    return render_template("account/settings.html", email_form=form,
                           password_form=ChangePasswordForm(), plain=PlainForm(),
                           locales=LOCALES), 422


@bp.get("/account/email/<token>")
def confirm_email(token: str) -> str | Response | tuple[str, int]:
    try:
        data = links.read("change-email", token)
    except TokenError as exc:
        return _bad_link(exc.reason)
    db = get_session()
    customer = accounts.find_by_public_id(db, str(data.get("c")))
    if customer is None:
        return _bad_link("invalid")
    try:
        with transaction(db):
            accounts.confirm_email_change(db, customer, str(data.get("m")))
    except AccountError:
        return _bad_link("used")
    sign_in(customer, "link")
    flash(_("Your email address is now %(email)s.", email=customer.email), "success")
    return redirect(url_for("account.settings"))


@bp.post("/account/password")
@login_required
def change_password() -> str | Response | tuple[str, int]:
    customer = current_customer()
    assert customer is not None
    form = ChangePasswordForm()
    if form.validate_on_submit():
        if not sensitive_allowed(form.current_password.data):
            form.current_password.errors.append(needs_password_message())
        else:
            db = get_session()
            try:
                with transaction(db):
                    accounts.set_password(db, customer, form.password.data or "")
            except AccountError as exc:
                form.password.errors.append(account_error(exc.code))
            else:
                sign_in(customer, "password")
                flash(_("Your password is changed."), "success")
                return redirect(url_for("account.settings"))
    return render_template("account/settings.html", email_form=ChangeEmailForm(),
                           password_form=form, plain=PlainForm(), locales=LOCALES), 422
