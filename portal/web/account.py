"""Sign up, verification, log in/out, forgotten password, emailed sign-in links, account
settings. Every answer about an address is the same whether or not it has an account."""

from __future__ import annotations

from datetime import timedelta
from email.message import EmailMessage

from flask import (
    Blueprint,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_babel import gettext as _
from flask_wtf import FlaskForm
from werkzeug.wrappers import Response

from portal.auth import (
    FRESH_LINK_SECONDS,
    current_customer,
    current_sign_in,
    limits,
    login_required,
    sign_in,
    sign_out,
)
from portal.core import mailer, ratelimit
from portal.core.db import get_session, utcnow
from portal.core.i18n import LOCALES
from portal.core.tokens import PURPOSES, TokenError, fingerprint, new_link_id
from portal.models.customer import Customer
from portal.services import accounts, sign_ins
from portal.services.accounts import AccountError
from portal.web import links, local_path, transaction
from portal.web.errors_text import account_error
from portal.web.forms import (
    ChangeEmailForm,
    ChangePasswordForm,
    EmailOnlyForm,
    ExportForm,
    LoginForm,
    PlainForm,
    ResetForm,
    SignupForm,
)
from portal.web.verification import send_verification

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
            send_verification(customer)
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
        return bad_link(exc.reason)
    session_db = get_session()
    with transaction(session_db):
        customer = accounts.find_by_public_id(session_db, str(data.get("c")))
        if customer is not None and customer.email == data.get("m") and \
                customer.email_verified_at is not None:
            # Single use: a second visit (or a copy of the link) signs nobody in.
            return bad_link("verified")
        if customer is None or not accounts.mark_email_verified(session_db, customer,
                                                                str(data.get("m"))):
            return bad_link("invalid")
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
        email = accounts.email_key(form.email.data or "")  # one count however spelt
        # Per (address, IP), then per address from anywhere: many IPs do not multiply it.
        wait = (ratelimit.hit("login", f"{email}|{request.remote_addr}")
                or ratelimit.hit("login_address", email))
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
        return bad_link(exc.reason)
    db = get_session()
    customer = accounts.find_by_public_id(db, str(data.get("c")))
    if customer is None or data.get("f") != fingerprint(customer.password_hash):
        return bad_link("used")
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
        return bad_link(exc.reason)
    customer = accounts.find_by_public_id(get_session(), str(data.get("c")))
    if customer is None or customer.erased_at is not None or \
            customer.auth_epoch != data.get("e"):
        return bad_link("invalid")
    sign_in(customer, "link")
    return redirect(url_for("preferences.page"))


def bad_link(reason: str) -> tuple[str, int]:
    messages = {
        "expired": _("This link has expired. Ask for a new one below."),
        "used": _("This link was already used or is no longer valid. Ask for a new one."),
        "taken": _("This address now belongs to another account, so it cannot be given back "
                   "to this one. Contact us for help."),
        "verified": _("This link was already used: your email address is confirmed. Sign "
                      "in with your password, or ask for a sign-in link below."),
    }
    message = messages.get(reason, _("This link is not valid. It may have been cut or "
                                     "changed. Ask for a new one below."))
    return render_template("errors/bad_link.html", message=message), 400


def sensitive_allowed(password: str | None) -> bool:
    """Changing the address or password, downloading or erasing the data takes the current
    password, or a single-use confirmation link followed in the last few minutes. An emailed
    manage or verification link (kept in a mailbox, forwarded, found later) never does."""
    customer = current_customer()
    assert customer is not None
    if password:
        return accounts.verify_password(customer, password)
    return sign_ins.may_change_credentials(current_sign_in(), utcnow())


def needs_password_message() -> str:
    return _("Enter your current password, or ask below for a link that confirms it is you "
             "(it works once, for %(minutes)s minutes).", minutes=FRESH_LINK_SECONDS // 60)


def render_settings(status: int = 200, **forms: FlaskForm) -> tuple[str, int]:
    """The account page, with ``forms`` in place of fresh ones (to show their errors)."""
    customer = current_customer()
    assert customer is not None
    current = current_sign_in()
    current_id = current.id if current is not None else None
    # This browser first, then the others, most recently used first.
    sessions = sorted(sign_ins.active(get_session(), customer, limits()),
                      key=lambda row: row.id != current_id)
    context = {"email_form": ChangeEmailForm(), "password_form": ChangePasswordForm(),
               "export_form": ExportForm(), **forms}
    return render_template(
        "account/settings.html", locales=LOCALES,
        sessions=sessions, current_session_id=current_id, **context), status


@bp.get("/account")
@login_required
def settings() -> tuple[str, int]:
    return render_settings()


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
                            "change-email", {"c": customer.public_id, "m": new,
                                             "e": customer.auth_epoch})))
                flash(_("We sent a confirmation link to %(email)s. Your address changes when "
                        "you follow it.", email=new), "success")
                return redirect(url_for("account.settings"))
    return render_settings(422, email_form=form)


@bp.get("/account/email/<token>")
def confirm_email(token: str) -> str | Response | tuple[str, int]:
    try:
        data = links.read("change-email", token)
    except TokenError as exc:
        return bad_link(exc.reason)
    db = get_session()
    customer = accounts.find_by_public_id(db, str(data.get("c")))
    if customer is None:
        return bad_link("invalid")
    if customer.auth_epoch != data.get("e"):
        return bad_link("used")  # the password changed since: the request is void
    try:
        with transaction(db):
            old_email = accounts.confirm_email_change(db, customer, str(data.get("m")))
    except AccountError:
        return bad_link("used")
    if old_email:
        _tell_old_address(customer, old_email)
    sign_in(customer, "link")
    flash(_("Your email address is now %(email)s. Every other session is signed out.",
            email=customer.email), "success")
    return redirect(url_for("account.settings"))


def masked(email: str) -> str:
    """``a•••@example.com``: enough for the owner to recognise, not to write to."""
    local, _at, domain = email.partition("@")
    return f"{local[:1]}•••@{domain}"


def _tell_old_address(customer: Customer, old_email: str) -> None:
    """The old address learns of the change and may take the account back for a week: the
    one who changed it may not be its owner."""
    link = links.external("account.undo_email_change", token=links.token(
        "undo-email-change", {"c": customer.public_id, "m": old_email, "j": new_link_id()}))
    mailer.send(old_email, "email_changed", customer.locale, link=link,
                new_email=masked(customer.email or ""),
                days=PURPOSES["undo-email-change"] // 86400)


@bp.route("/account/email/undo/<token>", methods=["GET", "POST"])
def undo_email_change(token: str) -> str | Response | tuple[str, int]:
    """GET shows a button, POST acts: mail scanners that open links must not act for the
    owner (or burn the single-use link before the owner follows it)."""
    try:
        data = links.read("undo-email-change", token)
    except TokenError as exc:
        return bad_link(exc.reason)
    db = get_session()
    customer = accounts.find_by_public_id(db, str(data.get("c")))
    old_email, link_id = str(data.get("m")), str(data.get("j") or "")
    if customer is None or customer.erased_at is not None:
        return bad_link("invalid")
    if accounts.link_used(db, link_id) or customer.email == old_email:
        return bad_link("used")
    form = PlainForm()
    if form.validate_on_submit():
        try:
            with transaction(db):
                if not accounts.use_link_once(db, link_id, utcnow() + timedelta(
                        seconds=PURPOSES["undo-email-change"])):
                    raise AccountError("stale_link", "email")
                accounts.undo_email_change(db, customer, old_email)
        except AccountError as exc:
            return bad_link("taken" if exc.code == "email_taken" else "used")
        sign_in(customer, "confirm")
        flash(_("Your email address is %(email)s again, and every other session is signed "
                "out. If you did not ask for the change, choose a new password now.",
                email=old_email), "success")
        return redirect(url_for("account.settings"))
    return render_template("account/undo_email.html", form=form, email=old_email)


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
    return render_settings(422, password_form=form)
