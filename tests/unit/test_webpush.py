"""Web push sending against a real local push service that verifies and decrypts.

Every message here goes over a socket (TLS unless said otherwise) to
``tests/support/fake_push_service.py``, which checks the VAPID JWT, the RFC 8030 headers
and decrypts the body with ``http_ece``: a passing test means a real push service would
have accepted the same bytes.
"""

from __future__ import annotations

import base64
import email.utils
import json
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from portal.push.webpush import (
    MAX_PAYLOAD_BYTES,
    VAPID_TOKEN_LIFETIME_SECONDS,
    InvalidPushOptions,
    PayloadTooLarge,
    VapidKeyError,
    VapidKeys,
    VapidSubjectError,
    WebPushSender,
    generate_vapid_keys,
    load_vapid_private_key,
    make_push_pool,
    parse_retry_after,
    save_vapid_private_key,
)

try:
    from tests.support.fake_push_service import Answer, FakePushService
except ModuleNotFoundError:  # pytest run without the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.support.fake_push_service import Answer, FakePushService

SUBJECT = "mailto:push@carnet.example"


@pytest.fixture(scope="module")
def vapid_keys() -> VapidKeys:
    return generate_vapid_keys()


@pytest.fixture
def push_service() -> Iterator[FakePushService]:
    with FakePushService(tls=True) as service:
        yield service


def _sender_for(
    service: FakePushService, keys: VapidKeys, *, timeout: float = 5.0
) -> WebPushSender:
    pool = make_push_pool(ca_certs=service.ca_path)
    # The local push service listens on 127.0.0.1: a private address, allowed here only.
    return WebPushSender(keys, SUBJECT, timeout=timeout, pool=pool, allow_private=True)


@pytest.fixture
def sender(push_service: FakePushService, vapid_keys: VapidKeys) -> Iterator[WebPushSender]:
    sender = _sender_for(push_service, vapid_keys)
    yield sender
    sender.pool.clear()


def _notification(size: int | None = None) -> bytes:
    body = json.dumps(
        {"title": "Double points this weekend", "body": "Visit any store", "url": "/loyalty"}
    ).encode()
    return body if size is None else (body * (size // len(body) + 1))[:size]


# --------------------------------------------------------------------------- delivery


def test_payload_reaches_the_service_decrypted_to_the_exact_bytes(
    push_service: FakePushService, sender: WebPushSender
) -> None:
    subscription = push_service.new_subscription()
    payload = _notification()

    outcome = sender.send(subscription, payload, ttl=3600, urgency="high", topic="points-promo")

    assert outcome.status == "sent" and outcome.http_status == 201
    (received,) = push_service.records
    assert received.status == 201
    assert received.plaintext == payload
    assert received.headers["content-encoding"] == "aes128gcm"
    assert received.headers["ttl"] == "3600"
    assert received.headers["urgency"] == "high"
    assert received.headers["topic"] == "points-promo"
    assert received.claims is not None
    assert received.claims["aud"] == push_service.origin
    assert received.claims["sub"] == SUBJECT
    assert received.claims["exp"] <= time.time() + VAPID_TOKEN_LIFETIME_SECONDS + 1


def test_each_message_is_encrypted_afresh(
    push_service: FakePushService, sender: WebPushSender
) -> None:
    subscription = push_service.new_subscription()
    payload = _notification()
    sender.send(subscription, payload, ttl=60)
    sender.send(subscription, payload, ttl=60)
    first, second = push_service.records
    assert first.plaintext == second.plaintext == payload
    # Same plaintext, different salt and ephemeral key: nothing links the two on the wire.
    assert first.body[:16] != second.body[:16]
    assert first.body[21:86] != second.body[21:86]
    assert first.body != second.body


def test_empty_payload_is_a_bodyless_tickle(
    push_service: FakePushService, sender: WebPushSender
) -> None:
    subscription = push_service.new_subscription()
    assert sender.send(subscription, b"", ttl=60).status == "sent"
    (received,) = push_service.records
    assert received.plaintext == b""
    assert "content-encoding" not in received.headers


def test_default_urgency_is_normal_and_topic_is_omitted(
    push_service: FakePushService, sender: WebPushSender
) -> None:
    sender.send(push_service.new_subscription(), _notification(), ttl=0)
    (received,) = push_service.records
    assert received.headers["ttl"] == "0"
    assert received.headers["urgency"] == "normal"
    assert "topic" not in received.headers


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ttl": -1}, "TTL"),
        ({"ttl": 86_400_000}, "TTL"),
        ({"ttl": True}, "TTL"),
        ({"ttl": "60"}, "TTL"),
        ({"ttl": 60, "urgency": "urgent"}, "Urgency"),
        ({"ttl": 60, "urgency": "HIGH"}, "Urgency"),
        ({"ttl": 60, "topic": "x" * 33}, "Topic"),
        ({"ttl": 60, "topic": "a+b/c="}, "Topic"),
        ({"ttl": 60, "topic": ""}, "Topic"),
    ],
)
def test_invalid_options_are_refused_before_anything_is_sent(
    push_service: FakePushService, sender: WebPushSender, options: dict, message: str
) -> None:
    subscription = push_service.new_subscription()
    with pytest.raises(InvalidPushOptions, match=message):
        sender.send(subscription, _notification(), **options)
    assert push_service.records == []


def test_ttl_is_mandatory(push_service: FakePushService, sender: WebPushSender) -> None:
    with pytest.raises(TypeError):
        sender.send(push_service.new_subscription(), _notification())  # type: ignore[call-arg]


def test_longest_topic_is_accepted(push_service: FakePushService, sender: WebPushSender) -> None:
    topic = "A-z_09" * 5 + "ok"
    assert len(topic) == 32
    assert sender.send(push_service.new_subscription(), b"x", ttl=60, topic=topic).delivered
    assert push_service.records[0].headers["topic"] == topic


# --------------------------------------------------------------------------- size limit


def test_payload_over_one_record_is_refused_before_the_network(
    push_service: FakePushService, sender: WebPushSender
) -> None:
    subscription = push_service.new_subscription()
    with pytest.raises(PayloadTooLarge) as excinfo:
        sender.send(subscription, _notification(MAX_PAYLOAD_BYTES + 1), ttl=60)
    assert excinfo.value.size == 3994
    with pytest.raises(PayloadTooLarge):
        sender.send_many([subscription], _notification(3994), ttl=60)
    assert push_service.records == []
    assert push_service.connections_opened == 0


def test_largest_single_record_payload_goes_through(
    push_service: FakePushService, sender: WebPushSender
) -> None:
    payload = _notification(MAX_PAYLOAD_BYTES)
    assert len(payload) == 3993
    outcome = sender.send(push_service.new_subscription(), payload, ttl=60)
    assert outcome.status == "sent"
    assert push_service.records[0].plaintext == payload


# --------------------------------------------------------------------------- VAPID


def test_message_signed_with_another_key_is_our_configuration_error(
    push_service: FakePushService, sender: WebPushSender, vapid_keys: VapidKeys
) -> None:
    """A subscription made with key A refuses key B: deactivating it would be wrong."""
    subscription = push_service.new_subscription(
        application_server_key=generate_vapid_keys().public_key
    )
    outcome = sender.send(subscription, _notification(), ttl=60)
    assert outcome.status == "config_error"
    assert outcome.http_status == 403
    assert not outcome.should_deactivate
    assert push_service.records[0].plaintext is None

    mine = push_service.new_subscription(application_server_key=vapid_keys.public_key)
    assert sender.send(mine, _notification(), ttl=60).status == "sent"


def test_token_that_does_not_verify_against_k_is_refused(
    push_service: FakePushService, vapid_keys: VapidKeys
) -> None:
    class AdvertisesAnotherKey(WebPushSender):
        def vapid_authorization(self, audience: str, *, now: float | None = None) -> str:
            header = super().vapid_authorization(audience, now=now)
            return header.split(", k=")[0] + ", k=" + generate_vapid_keys().public_key

    sender = AdvertisesAnotherKey(
        vapid_keys, SUBJECT, pool=make_push_pool(ca_certs=push_service.ca_path),
        allow_private=True
    )
    with sender.pool:
        outcome = sender.send(push_service.new_subscription(), _notification(), ttl=60)
    assert (outcome.status, outcome.http_status) == ("config_error", 401)
    assert "signature" in push_service.records[0].reason


@pytest.mark.parametrize(
    "subject",
    ["push@carnet.example", "mailto:", "admin@localhost", "http://carnet.example", "https://", ""],
)
def test_subject_must_be_mailto_or_https(vapid_keys: VapidKeys, subject: str) -> None:
    with pytest.raises(VapidSubjectError):
        WebPushSender(vapid_keys, subject)


@pytest.mark.parametrize("subject", [SUBJECT, "https://carnet.example/contact"])
def test_valid_subjects_are_accepted(vapid_keys: VapidKeys, subject: str) -> None:
    with WebPushSender(vapid_keys, subject) as sender:
        assert sender.subject == subject


def test_claims_follow_each_push_service(vapid_keys: VapidKeys) -> None:
    """pywebpush keeps the first ``aud`` in a reused claims dict; the second service refuses."""
    with FakePushService(tls=True) as first, FakePushService(tls=True) as second:
        # One pool trusting both throw-away CAs.
        bundle = Path(first.ca_path).parent / "both.pem"
        bundle.write_bytes(Path(first.ca_path).read_bytes() + Path(second.ca_path).read_bytes())
        with make_push_pool(ca_certs=str(bundle)) as pool:
            sender = WebPushSender(vapid_keys, SUBJECT, pool=pool, allow_private=True)
            a, b = first.new_subscription(), second.new_subscription()
            outcomes = [sender.send(s, b"hello", ttl=60) for s in (a, b, a, b)]
        assert [o.status for o in outcomes] == ["sent"] * 4
        assert {r.claims["aud"] for r in first.records if r.claims} == {first.origin}
        assert {r.claims["aud"] for r in second.records if r.claims} == {second.origin}


# --------------------------------------------------------------------------- keys


def test_missing_key_file_fails_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "vapid_private.pem"
    with pytest.raises(VapidKeyError, match="does not exist"):
        load_vapid_private_key(missing)
    with pytest.raises(VapidKeyError):
        WebPushSender(str(missing), SUBJECT)
    assert not missing.exists()


def test_unusable_keys_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(VapidKeyError):
        load_vapid_private_key(garbage)
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(VapidKeyError, match="P-256"):
        load_vapid_private_key(rsa_pem)
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(VapidKeyError, match="P-256"):
        load_vapid_private_key(p384)


def test_saved_key_loads_back_and_is_never_overwritten(tmp_path: Path) -> None:
    keys = generate_vapid_keys()
    path = save_vapid_private_key(keys, tmp_path / "vapid.pem")
    assert path.stat().st_mode & 0o077 == 0
    assert load_vapid_private_key(path).public_key == keys.public_key
    assert load_vapid_private_key(keys.private_pem).public_key == keys.public_key
    assert load_vapid_private_key(keys.private_key_b64url).public_key == keys.public_key
    with pytest.raises(VapidKeyError, match="refusing"):
        save_vapid_private_key(generate_vapid_keys(), path)
    assert load_vapid_private_key(path).public_key == keys.public_key


def test_application_server_key_is_an_uncompressed_p256_point(vapid_keys: VapidKeys) -> None:
    raw = serialization.load_pem_private_key(vapid_keys.private_pem.encode(), None)
    assert isinstance(raw, ec.EllipticCurvePrivateKey)
    point = base64.urlsafe_b64decode(vapid_keys.public_key + "=")
    assert len(point) == 65 and point[0] == 4
    assert "=" not in vapid_keys.public_key


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize("status", [404, 410])
def test_gone_subscription_is_deactivated_by_exact_endpoint(
    push_service: FakePushService, sender: WebPushSender, status: int
) -> None:
    subscription = push_service.new_subscription()
    push_service.script(subscription["endpoint"], Answer(status))
    outcome = sender.send(subscription, _notification(), ttl=60)
    assert outcome.status == "gone" and outcome.should_deactivate
    assert outcome.endpoint == subscription["endpoint"]
    assert outcome.http_status == status


def test_unknown_endpoint_on_the_service_is_gone(
    push_service: FakePushService, sender: WebPushSender
) -> None:
    subscription = push_service.new_subscription()
    subscription["endpoint"] += "-expired"
    assert sender.send(subscription, b"x", ttl=60).status == "gone"


def test_413_is_too_large(push_service: FakePushService, sender: WebPushSender) -> None:
    subscription = push_service.new_subscription()
    push_service.script(subscription["endpoint"], Answer(413))
    outcome = sender.send(subscription, b"x", ttl=60)
    assert outcome.status == "too_large" and not outcome.should_deactivate


def test_429_carries_retry_after_seconds(
    push_service: FakePushService, sender: WebPushSender
) -> None:
    subscription = push_service.new_subscription()
    push_service.script(subscription["endpoint"], Answer(429, {"Retry-After": "120"}))
    outcome = sender.send(subscription, b"x", ttl=60)
    assert (outcome.status, outcome.retry_after) == ("rate_limited", 120.0)


def test_429_with_http_date_retry_after(
    push_service: FakePushService, sender: WebPushSender
) -> None:
    subscription = push_service.new_subscription()
    when = email.utils.formatdate(time.time() + 300, usegmt=True)
    push_service.script(subscription["endpoint"], Answer(429, {"Retry-After": when}))
    outcome = sender.send(subscription, b"x", ttl=60)
    assert outcome.status == "rate_limited"
    assert outcome.retry_after is not None and 290 <= outcome.retry_after <= 300


def test_retry_after_parsing_edges() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 60) == 60.0


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_retried(
    push_service: FakePushService, sender: WebPushSender, status: int
) -> None:
    subscription = push_service.new_subscription()
    push_service.script(subscription["endpoint"], Answer(status, {"Retry-After": "30"}))
    outcome = sender.send(subscription, b"x", ttl=60)
    assert (outcome.status, outcome.retry_after) == ("retry", 30.0)
    assert not outcome.should_deactivate


@pytest.mark.parametrize("status", [400, 401, 403])
def test_scripted_4xx_is_a_configuration_error(
    push_service: FakePushService, sender: WebPushSender, status: int
) -> None:
    subscription = push_service.new_subscription()
    push_service.script(subscription["endpoint"], Answer(status))
    outcome = sender.send(subscription, b"x", ttl=60)
    assert outcome.status == "config_error" and not outcome.should_deactivate


def test_scripted_answers_are_consumed_in_order(
    push_service: FakePushService, sender: WebPushSender
) -> None:
    subscription = push_service.new_subscription()
    push_service.script(subscription["endpoint"], Answer(503), Answer(201))
    statuses = [sender.send(subscription, b"x", ttl=60).status for _ in range(3)]
    assert statuses == ["retry", "sent", "sent"]


def test_stalled_service_is_retry_within_the_timeout(
    push_service: FakePushService, vapid_keys: VapidKeys
) -> None:
    sender = _sender_for(push_service, vapid_keys, timeout=0.5)
    subscription = push_service.new_subscription()
    push_service.script(subscription["endpoint"], Answer(stall=True))
    started = time.monotonic()
    with sender.pool:
        outcome = sender.send(subscription, b"x", ttl=60)
    elapsed = time.monotonic() - started
    assert push_service.stalled.is_set()
    assert outcome.status == "retry" and "timeout" in outcome.detail
    assert elapsed < 3.0


def test_unreachable_service_is_retry(vapid_keys: VapidKeys) -> None:
    service = FakePushService(tls=True).start()
    subscription = service.new_subscription()
    service.stop()  # the port is closed now: connection refused
    with WebPushSender(vapid_keys, SUBJECT, timeout=2.0, allow_private=True) as sender:
        outcome = sender.send(subscription, b"x", ttl=60)
    assert outcome.status == "retry" and "cannot connect" in outcome.detail
    # The kind of failure, not the error's text: no address or port to map a network with.
    port = subscription["endpoint"].split(":")[2].split("/")[0]
    assert "127.0.0.1" not in outcome.detail and port not in outcome.detail


def test_malformed_subscription_is_reported_not_raised(
    push_service: FakePushService, sender: WebPushSender
) -> None:
    good = push_service.new_subscription()
    bad_keys = {"endpoint": good["endpoint"], "keys": {"p256dh": "AAAA", "auth": "AAAA"}}
    plain_http = dict(good, endpoint=good["endpoint"].replace("https:", "http:"))
    outcomes = sender.send_many([bad_keys, plain_http, good], b"x", ttl=60)
    assert [o.status for o in outcomes] == ["invalid_subscription"] * 2 + ["sent"]
    assert outcomes[0].should_deactivate
    assert len(push_service.records) == 1


def test_plain_http_push_service_only_when_allowed(vapid_keys: VapidKeys) -> None:
    with FakePushService(tls=False) as service:
        subscription = service.new_subscription()
        with WebPushSender(vapid_keys, SUBJECT, allow_http=True, allow_private=True) as sender:
            assert sender.send(subscription, b"local", ttl=60).status == "sent"
        assert service.records[0].plaintext == b"local"


# --------------------------------------------------------------------------- connections


def test_consecutive_sends_reuse_one_connection(
    push_service: FakePushService, sender: WebPushSender
) -> None:
    subscriptions = [push_service.new_subscription() for _ in range(5)]
    for subscription in subscriptions:
        assert sender.send(subscription, _notification(), ttl=60).delivered
    assert push_service.connections_opened == 1
    assert len({r.connection_id for r in push_service.records}) == 1


def test_send_many_keeps_order_and_bounds_connections(
    push_service: FakePushService, sender: WebPushSender
) -> None:
    subscriptions = [push_service.new_subscription() for _ in range(40)]
    push_service.script(subscriptions[3]["endpoint"], Answer(410))
    push_service.script(subscriptions[7]["endpoint"], Answer(429, {"Retry-After": "5"}))
    outcomes = sender.send_many(subscriptions, _notification(), ttl=60, workers=4)
    assert [o.endpoint for o in outcomes] == [s["endpoint"] for s in subscriptions]
    assert outcomes[3].status == "gone" and outcomes[7].status == "rate_limited"
    assert sum(o.delivered for o in outcomes) == 38
    assert push_service.connections_opened <= 4
    decrypted = [r.plaintext for r in push_service.records]
    assert decrypted == [_notification()] * 40


def test_sender_made_pool_verifies_and_keeps_connections(vapid_keys: VapidKeys) -> None:
    with WebPushSender(vapid_keys, SUBJECT) as sender:
        settings = sender.pool.connection_pool_kw
        assert settings["maxsize"] >= 4 and settings["cert_reqs"] == "CERT_REQUIRED"


def test_untrusted_certificate_is_retry_not_sent(
    push_service: FakePushService, vapid_keys: VapidKeys
) -> None:
    """Default trust store: the throw-away CA is unknown, so nothing is delivered."""
    with WebPushSender(vapid_keys, SUBJECT, timeout=2.0, allow_private=True) as sender:
        outcome = sender.send(push_service.new_subscription(), b"x", ttl=60)
    assert outcome.status == "retry" and "SSL" in outcome.detail
    assert push_service.records == []


# --------------------------------------------------------------------------- destinations

PUSH_NAME = "push.example.test"


def _resolver(mapping: dict[str, list[str]]) -> Callable[..., list[tuple[Any, ...]]]:
    """A stand-in for ``socket.getaddrinfo`` (no DNS here): names to the addresses given."""

    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if host not in mapping:
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port)) for a in mapping[host]]

    return resolve


@pytest.fixture
def named_service() -> Iterator[FakePushService]:
    """The local push service under a DNS name, its certificate made for that name."""
    with FakePushService(tls=True, name=PUSH_NAME) as service:
        yield service


def _port(service: FakePushService) -> str:
    return service.origin.rsplit(":", 1)[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "2130706433", "0x7f.1", "[::ffff:127.0.0.1]",
                                  "[::1]", "localhost", "169.254.169.254"])
def test_a_private_endpoint_is_refused_before_any_connection(
    push_service: FakePushService, vapid_keys: VapidKeys, host: str
) -> None:
    subscription = push_service.new_subscription()
    endpoint = subscription["endpoint"].replace("127.0.0.1", host)
    pool = make_push_pool(ca_certs=push_service.ca_path)
    with WebPushSender(vapid_keys, SUBJECT, pool=pool, timeout=2.0) as sender:
        outcome = sender.send(dict(subscription, endpoint=endpoint), b"secret", ttl=60)
    assert outcome.status == "refused_destination" and outcome.should_deactivate
    assert outcome.endpoint == endpoint
    assert push_service.records == [] and push_service.connections_opened == 0


def test_a_name_that_resolves_to_a_private_address_is_refused_when_sending(
    named_service: FakePushService, vapid_keys: VapidKeys
) -> None:
    """Public-looking at subscription time; its DNS answer is what counts when sending, and
    every address in it must pass (the client could pick any of them)."""
    subscription = named_service.new_subscription()
    pool = make_push_pool(ca_certs=named_service.ca_path)
    for answer in (["127.0.0.1"], ["93.184.216.34", "127.0.0.1"], ["10.0.0.7"], ["::1"]):
        with WebPushSender(vapid_keys, SUBJECT, pool=pool, timeout=2.0,
                           resolver=_resolver({PUSH_NAME: answer})) as sender:
            outcome = sender.send(subscription, b"secret", ttl=60)
        assert outcome.status == "refused_destination", answer
        assert outcome.detail.startswith("private_address")
    assert named_service.records == [] and named_service.connections_opened == 0


def test_a_pinned_send_verifies_tls_for_the_name_and_keeps_its_connection(
    named_service: FakePushService, vapid_keys: VapidKeys
) -> None:
    """The request goes to the checked address, while TLS sends and verifies the endpoint's
    name and the Host header names it; consecutive sends share one connection."""
    resolver = _resolver({PUSH_NAME: ["127.0.0.1"], "other.example.test": ["127.0.0.1"]})
    pool = make_push_pool(ca_certs=named_service.ca_path)
    with WebPushSender(vapid_keys, SUBJECT, pool=pool, timeout=2.0, allow_private=True,
                       resolver=resolver) as sender:
        subscriptions = [named_service.new_subscription() for _ in range(3)]
        assert subscriptions[0]["endpoint"].startswith(f"https://{PUSH_NAME}:")
        outcomes = [sender.send(s, b"pinned", ttl=60) for s in subscriptions]
        assert [o.status for o in outcomes] == ["sent"] * 3
        assert [r.plaintext for r in named_service.records] == [b"pinned"] * 3
        assert {r.headers["host"] for r in named_service.records} == {
            f"{PUSH_NAME}:{_port(named_service)}"}
        assert {r.claims["aud"] for r in named_service.records if r.claims} == {
            named_service.origin}
        assert named_service.connections_opened == 1
        # Same address, a name the certificate does not cover (it does cover 127.0.0.1):
        # refused by TLS, so the name is what is verified, not the address connected to.
        other = dict(subscriptions[0], endpoint=subscriptions[0]["endpoint"].replace(
            PUSH_NAME, "other.example.test"))
        outcome = sender.send(other, b"pinned", ttl=60)
    assert outcome.status == "retry" and "TLS" in outcome.detail
    assert len(named_service.records) == 3


def test_a_name_that_does_not_resolve_is_retried_without_the_resolver_text(
    named_service: FakePushService, vapid_keys: VapidKeys
) -> None:
    with WebPushSender(vapid_keys, SUBJECT, timeout=2.0, resolver=_resolver({})) as sender:
        outcome = sender.send(named_service.new_subscription(), b"x", ttl=60)
    assert outcome.status == "retry" and not outcome.should_deactivate
    assert outcome.detail.startswith("unresolvable") and "not known" not in outcome.detail
