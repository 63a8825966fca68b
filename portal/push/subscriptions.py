"""Web push opt-in: browser subscriptions and the topics chosen for them.

A signed-in customer's web push choices are ordinary consent events for
(topic, ``web_push``), recorded with :func:`record_consent`; one choice covers every browser
they subscribed. A visitor who is not signed in has no customer record, so their choices are
recorded against the device: consent events with no customer and a
``push_subscription_id``, the current state in :class:`PushTopicChoice`. When that visitor
signs in, :func:`adopt_device` moves the subscription to the customer and merges the choices,
most restrictive first, as the identity merge does.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from portal.core.db import utcnow
from portal.core.outbound import RefusedDestination, check_url
from portal.models.consent import ConsentEvent, ConsentProof, ConsentState
from portal.models.customer import Customer
from portal.push.models import PushSubscription, PushTopicChoice
from portal.push.webpush import InvalidSubscription, parse_subscription
from portal.services.catalog import Catalog, TopicInfo
from portal.services.consent import Proof, proof_digest, record_consent
from portal.services.decisions import Evidence, Facts
from portal.services.privacy import PrivacyHooks

CHANNEL = "web_push"
MAX_TOPICS = 50
MAX_ENDPOINT_LENGTH = 2048


class PushInputError(ValueError):
    """Input the opt-in endpoints refuse; ``field`` and ``code`` are shown to the caller.
    ``reason`` is the destination rule's code when the endpoint is a refused destination."""

    def __init__(self, code: str, field: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field
        self.reason = reason


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def new_device_token() -> str:
    """The device cookie's value; only its SHA-256 is stored."""
    return secrets.token_urlsafe(24)


def web_push_topics(catalog: Catalog) -> list[TopicInfo]:
    """Topics a person may pick in the opt-in panel: offered on web push, not required."""
    return [t for t in catalog.ordered() if CHANNEL in t.channels and not t.required]


@dataclass(frozen=True)
class SubscriptionInput:
    endpoint: str
    p256dh: str
    auth: str


def check_subscription(raw: object, *, allow_http: bool,
                       allow_private: bool = False) -> SubscriptionInput:
    """``PushSubscription.toJSON()`` as posted by the browser, checked before it is stored.

    The endpoint is a URL the worker will POST to, so it also passes the destination rule
    (:func:`portal.core.outbound.check_url`): no loopback, private, link-local or reserved address
    in any notation, no local name, no userinfo, no privileged port. ``allow_private``
    (``WEBHOOK_ALLOW_PRIVATE_NETWORKS``) lifts the address and name rules for a push service
    on one's own machine, as in the test suite."""
    if not isinstance(raw, Mapping):
        raise PushInputError("type", "subscription", "subscription must be an object")
    endpoint = raw.get("endpoint")
    if isinstance(endpoint, str) and len(endpoint) > MAX_ENDPOINT_LENGTH:
        raise PushInputError("too_long", "subscription.endpoint",
                             f"endpoint is longer than {MAX_ENDPOINT_LENGTH} characters")
    try:
        parse_subscription(raw, allow_http=allow_http)
    except InvalidSubscription as exc:
        field = "subscription.keys" if "key" in str(exc) or "auth" in str(exc) \
            or "p256dh" in str(exc) else "subscription.endpoint"
        raise PushInputError("invalid_subscription", field, str(exc)) from exc
    keys = raw["keys"]
    assert isinstance(keys, Mapping) and isinstance(endpoint, str)
    try:
        check_url(endpoint, allow_private=allow_private,
                  schemes=("https", "http") if allow_http else ("https",))
    except RefusedDestination as exc:
        raise PushInputError("refused_destination", "subscription.endpoint", str(exc),
                             exc.reason) from exc
    p256dh, auth = str(keys["p256dh"]).strip(), str(keys["auth"]).strip()
    if len(p256dh) > 128 or len(auth) > 64:
        raise PushInputError("too_long", "subscription.keys", "subscription keys are too long")
    return SubscriptionInput(endpoint, p256dh, auth)


def check_topics(raw: object, catalog: Catalog) -> list[str]:
    if not isinstance(raw, list):
        raise PushInputError("type", "topics", "topics must be a list of topic keys")
    if len(raw) > MAX_TOPICS:
        raise PushInputError("too_many", "topics", f"at most {MAX_TOPICS} topics")
    offered = {t.key for t in web_push_topics(catalog)}
    picked: list[str] = []
    for index, key in enumerate(raw):
        if not isinstance(key, str):
            raise PushInputError("type", f"topics[{index}]", "a topic key is a string")
        if key not in offered:
            code = "unknown_topic" if catalog.get(key) is None else "channel_not_offered"
            raise PushInputError(code, f"topics[{index}]",
                                 f"'{key[:64]}' is not a topic offered by browser notification")
        if key not in picked:
            picked.append(key)
    return picked


def find_by_endpoint(session: Session, endpoint: str) -> PushSubscription | None:
    return session.scalars(select(PushSubscription)
                           .where(PushSubscription.endpoint == endpoint)).first()


def find_by_hash(session: Session, endpoint_hash: str) -> PushSubscription | None:
    return session.scalars(select(PushSubscription)
                           .where(PushSubscription.endpoint_hash == endpoint_hash)).first()


def active(sub: PushSubscription) -> bool:
    return sub.expired_at is None


class OwnedElsewhere(Exception):
    """An anonymous visitor posted the endpoint of a subscription that belongs to an account:
    its choices are the account's, so only that customer (signed in) may change them."""


def save_subscription(
    session: Session,
    data: SubscriptionInput,
    *,
    customer: Customer | None,
    device_hash: str | None,
    user_agent: str | None,
    locale: str | None,
    now: datetime | None = None,
) -> tuple[PushSubscription, bool]:
    """Create or refresh the row for this endpoint; True when it is new.

    A signed-in customer takes over a device's anonymous subscription (its choices are then
    merged by :func:`adopt_device`). A browser reused by someone who signs in to another
    account follows the person now signed in: the subscription lives in that browser.
    """
    now = now or utcnow()
    sub = find_by_endpoint(session, data.endpoint)
    created = sub is None
    if sub is None:
        sub = PushSubscription(public_id="psub_" + secrets.token_urlsafe(12),
                               endpoint=data.endpoint, endpoint_hash=sha256(data.endpoint),
                               created_at=now)
        session.add(sub)
    elif customer is None and sub.customer_id is not None:
        raise OwnedElsewhere()
    sub.p256dh, sub.auth = data.p256dh, data.auth
    if customer is not None:
        sub.customer_id = customer.id
    if device_hash:
        sub.device_hash = device_hash
    sub.user_agent = (user_agent or "")[:512] or None
    sub.locale = locale
    sub.last_seen_at = now
    sub.expired_at = sub.expired_reason = None
    session.flush()
    return sub, created


def belongs_to(sub: PushSubscription, customer: Customer | None,
               device_hash: str | None) -> bool:
    """The caller's own subscription: the signed-in customer's, or one made in this browser
    (its device cookie's hash). Knowing the endpoint alone proves neither."""
    if customer is not None and sub.customer_id == customer.id:
        return True
    return device_hash is not None and sub.device_hash == device_hash


def renew(session: Session, old_endpoint: str, new: SubscriptionInput, *,
          customer: Customer | None, device_hash: str | None,
          now: datetime | None = None) -> bool:
    """The browser replaced its subscription (``pushsubscriptionchange``): the same row, so
    its owner and choices, takes the new endpoint and keys.

    Only the caller's own subscription (:func:`belongs_to`) is renewed: re-pointing someone
    else's row to an endpoint of one's own would deliver their messages to oneself. False,
    with nothing changed, when there is no such subscription of the caller's."""
    now = now or utcnow()
    sub = find_by_endpoint(session, old_endpoint)
    if sub is None or not belongs_to(sub, customer, device_hash):
        return False
    other = find_by_endpoint(session, new.endpoint)
    if other is not None and other.id != sub.id:
        # The page re-synced first and saved the new endpoint already: keep that row.
        sub.expired_at, sub.expired_reason = now, "replaced"
        return True
    sub.endpoint, sub.endpoint_hash = new.endpoint, sha256(new.endpoint)
    sub.p256dh, sub.auth = new.p256dh, new.auth
    sub.last_seen_at = now
    sub.expired_at = sub.expired_reason = None
    return True


def leave(session: Session, endpoint: str, now: datetime | None = None) -> bool:
    """The person switched notifications off in this browser. The subscription (the contact
    point) goes; their consent choices stay, as when someone removes a phone number."""
    result = session.execute(
        update(PushSubscription)
        .where(PushSubscription.endpoint == endpoint, PushSubscription.expired_at.is_(None))
        .values(expired_at=now or utcnow(), expired_reason="left")
    )
    return bool(getattr(result, "rowcount", 0))


def expire_endpoint(session: Session, endpoint: str, reason: str,
                    now: datetime | None = None) -> int:
    """The push service says the subscription is gone: exactly this endpoint, nothing else."""
    result = session.execute(
        update(PushSubscription)
        .where(PushSubscription.endpoint == endpoint, PushSubscription.expired_at.is_(None))
        .values(expired_at=now or utcnow(), expired_reason=reason[:32])
    )
    return int(getattr(result, "rowcount", 0) or 0)


# --- choices -------------------------------------------------------------------------------


def device_choices(session: Session, sub: PushSubscription) -> dict[str, PushTopicChoice]:
    return {c.topic_key: c for c in session.scalars(
        select(PushTopicChoice).where(PushTopicChoice.subscription_id == sub.id))}


def chosen_topics(session: Session, catalog: Catalog, sub: PushSubscription | None,
                  customer: Customer | None) -> list[str]:
    """The topics the panel shows as picked: the customer's web push consent when signed in,
    else the device's own choices."""
    offered = [t.key for t in web_push_topics(catalog)]
    if customer is not None:
        states = {s.topic_key: s.state for s in session.scalars(select(ConsentState).where(
            ConsentState.customer_id == customer.id, ConsentState.channel == CHANNEL))}
        return [k for k in offered if states.get(k) in ("granted", "pending")]
    if sub is None:
        return []
    choices = device_choices(session, sub)
    return [k for k in offered if k in choices and choices[k].state == "granted"]


def record_device_choice(
    session: Session, sub: PushSubscription, topic: TopicInfo, state: str, proof: Proof,
    now: datetime | None = None,
) -> ConsentEvent:
    """An anonymous device's consent event and its current state, in one transaction."""
    now = now or utcnow()
    event = ConsentEvent(
        customer_id=None, push_subscription_id=sub.id, topic_key=topic.key, channel=CHANNEL,
        state=state, source=proof.source, actor=proof.actor[:120],
        wording_version=topic.wording_version, wording_hash=topic.wording_hash,
        proof_digest=proof_digest(now, proof), occurred_at=now,
    )
    session.add(event)
    session.flush()
    session.add(ConsentProof(event_id=event.id, ip=proof.ip,
                             user_agent=(proof.user_agent or "")[:1000] or None))
    row = session.get(PushTopicChoice, (sub.id, topic.key))
    if row is None:
        session.add(PushTopicChoice(subscription_id=sub.id, topic_key=topic.key, state=state,
                                    event_id=event.id, updated_at=now))
    else:
        row.state, row.event_id, row.updated_at = state, event.id, now
    return event


def set_topics(
    session: Session, catalog: Catalog, sub: PushSubscription, customer: Customer | None,
    topics: Sequence[str], proof: Proof,
) -> int:
    """Make the picked topics granted and the other web push topics withdrawn, recording only
    what changes. For a customer the choice is theirs (every browser); otherwise the device's.
    Returns the number of events recorded."""
    picked = set(topics)
    current = set(chosen_topics(session, catalog, sub, customer))
    recorded = 0
    for topic in web_push_topics(catalog):
        want = topic.key in picked
        if want == (topic.key in current):
            continue
        state = "granted" if want else "withdrawn"
        if customer is not None:
            record_consent(session, customer, topic.key, CHANNEL, state, proof, catalog=catalog)
        else:
            record_device_choice(session, sub, topic, state, proof)
        recorded += 1
    return recorded


# --- joining an account ---------------------------------------------------------------------

RESTRICTIVENESS = {"withdrawn": 2, "pending": 1, "granted": 0}


def adopt_device(
    session: Session, catalog: Catalog, customer: Customer, subs: Iterable[PushSubscription],
    proof: Proof,
) -> int:
    """The visitor signed in: their anonymous subscriptions become the customer's, and the
    device's choices join the customer's, most restrictive first.

    A device "withdrawn" beats a customer "granted"; a device "granted" becomes the
    customer's choice only where the customer has recorded none (it never overrides a
    customer's "withdrawn" or "pending"). Every change is a consent event for the customer
    with source ``web_push``, carrying the wording version the device was shown.
    Returns the number of events recorded.
    """
    subs = [s for s in subs if s.customer_id is None]
    if not subs:
        return 0
    states = {s.topic_key: s.state for s in session.scalars(select(ConsentState).where(
        ConsentState.customer_id == customer.id, ConsentState.channel == CHANNEL))}
    device: dict[str, tuple[str, int | None]] = {}
    for sub in subs:
        for choice in device_choices(session, sub).values():
            event = session.get(ConsentEvent, choice.event_id)
            version = event.wording_version if event is not None else None
            seen = device.get(choice.topic_key)
            if seen is None or RESTRICTIVENESS[choice.state] > RESTRICTIVENESS[seen[0]]:
                device[choice.topic_key] = (choice.state, version)
        sub.customer_id = customer.id
    recorded = 0
    for topic_key, (state, version) in sorted(device.items()):
        topic = catalog.get(topic_key)
        if topic is None or CHANNEL not in topic.channels or topic.required:
            continue
        mine = states.get(topic_key)
        if state == "withdrawn" and mine != "withdrawn":
            new_state = "withdrawn"
        elif state == "granted" and mine is None:
            new_state = "granted"
        else:
            continue
        record_consent(session, customer, topic_key, CHANNEL, new_state, proof,
                       catalog=catalog, wording_version=version)
        recorded += 1
    session.flush()
    return recorded


def anonymous_device_subscriptions(session: Session, device_hash: str) -> list[PushSubscription]:
    return list(session.scalars(select(PushSubscription).where(
        PushSubscription.device_hash == device_hash, PushSubscription.customer_id.is_(None),
        PushSubscription.expired_at.is_(None))))


# --- decisions ------------------------------------------------------------------------------


def resolve_contacts(session: Session, customers: Sequence[Customer]) -> dict[int, dict[str, Any]]:
    """``CONTACT_RESOLVERS["web_push"]``: reachable when at least one browser is subscribed."""
    ids = [c.id for c in customers]
    if not ids:
        return {}
    rows = session.execute(
        select(PushSubscription.customer_id, func.count(PushSubscription.id))
        .where(PushSubscription.customer_id.in_(ids), PushSubscription.expired_at.is_(None))
        .group_by(PushSubscription.customer_id))
    return {cid: {"web_push_subscriptions": int(count)} for cid, count in rows if cid}


def device_facts(session: Session, subs: Sequence[PushSubscription],
                 topic_key: str) -> dict[int, Facts]:
    """Facts for anonymous devices, so that :func:`decide` judges them by the same rules as
    customers: the device's own choice, no switches, no suppressions, reachable while active."""
    if not subs:
        return {}
    rows = session.execute(
        select(PushTopicChoice.subscription_id, ConsentEvent)
        .join(ConsentEvent, ConsentEvent.id == PushTopicChoice.event_id)
        .where(PushTopicChoice.subscription_id.in_([s.id for s in subs]),
               PushTopicChoice.topic_key == topic_key))
    choices = {
        sid: Evidence(e.id, e.occurred_at, e.source, e.wording_version, e.state)
        for sid, e in rows
    }
    return {
        s.id: Facts(choice=choices.get(s.id),
                    contact={"subscription": s.public_id} if active(s) else None)
        for s in subs
    }


# --- privacy ---------------------------------------------------------------------------------


EXPORT_NAME = "web_push_subscriptions"


def export_subscriptions(session: Session, customer: Customer) -> list[dict[str, Any]]:
    """Each browser: when it subscribed, its user agent, and the topics chosen on it."""
    subs = list(session.scalars(select(PushSubscription).where(
        PushSubscription.customer_id == customer.id).order_by(PushSubscription.id)))
    choices: dict[int, list[dict[str, Any]]] = {}
    for choice in session.scalars(select(PushTopicChoice).where(
            PushTopicChoice.subscription_id.in_([s.id for s in subs]))
            .order_by(PushTopicChoice.subscription_id, PushTopicChoice.topic_key)):
        choices.setdefault(choice.subscription_id, []).append(
            {"topic": choice.topic_key, "state": choice.state,
             "updated_at": choice.updated_at.isoformat()})
    return [
        {"id": s.public_id, "created_at": s.created_at.isoformat(),
         "last_seen_at": s.last_seen_at.isoformat(), "user_agent": s.user_agent,
         "active": active(s), "topics": choices.get(s.id, [])}
        for s in subs
    ]


def erase_subscriptions(session: Session, customer: Customer) -> None:
    """Expire and blank the customer's subscriptions and drop the topics chosen on them; the
    rows stay because device consent events may point at them. Those events (chosen before
    the browser was signed in) stay as proof, pseudonymous like the customer's own: their
    address and user agent go."""
    subs = select(PushSubscription.id).where(PushSubscription.customer_id == customer.id)
    session.execute(delete(PushTopicChoice).where(PushTopicChoice.subscription_id.in_(subs)))
    device_events = select(ConsentEvent.id).where(ConsentEvent.push_subscription_id.in_(subs))
    session.execute(update(ConsentProof).where(ConsentProof.event_id.in_(device_events))
                    .values(ip=None, user_agent=None))
    for sub in session.scalars(select(PushSubscription).where(
            PushSubscription.customer_id == customer.id)):
        sub.endpoint = f"erased:{sub.public_id}"
        sub.endpoint_hash = sha256(sub.endpoint)
        sub.p256dh = sub.auth = ""
        sub.user_agent = None
        sub.device_hash = None
        sub.expired_at = sub.expired_at or utcnow()
        sub.expired_reason = "erased"


def register_privacy(hooks: PrivacyHooks) -> None:
    """Subscriptions (endpoint, keys, user agent) and device choices are personal data."""
    hooks.add_exporter(EXPORT_NAME, export_subscriptions)
    hooks.add_eraser(EXPORT_NAME, erase_subscriptions)
