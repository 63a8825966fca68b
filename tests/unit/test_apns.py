"""Pass update pushes, checked on the wire by a real HTTP/2 stand-in for APNs."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from passes.devcerts import create_dev_apple_credentials, read_key_id
from portal.delivery.apns import APNsClient, ProviderToken, PushOutcome
from tests.support.fake_apns import FakeAPNs, Reply

PASS_TYPE_ID = "pass.com.example.carnet"
TEAM_ID = "ABCDE12345"
TOKEN_A, TOKEN_B, TOKEN_C, TOKEN_D = ("a1" * 32, "b2" * 32, "c3" * 32, "d4" * 32)


class Clock:
    """A clock the test moves by hand, so token ageing needs no waiting."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, minutes: float) -> None:
        self.now += minutes * 60


@pytest.fixture(scope="module")
def dev_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return create_dev_apple_credentials(tmp_path_factory.mktemp("apns"), PASS_TYPE_ID, TEAM_ID)


@pytest.fixture
def server(dev_paths: dict[str, Path], tmp_path: Path) -> Iterator[FakeAPNs]:
    key = serialization.load_pem_private_key(dev_paths["apns_key"].read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    with FakeAPNs(
        directory=tmp_path / "tls",
        team_id=TEAM_ID,
        key_id=read_key_id(dev_paths),
        public_key=key.public_key(),
        topic=PASS_TYPE_ID,
    ) as fake:
        yield fake


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_client(
    dev_paths: dict[str, Path], server: FakeAPNs, clock: Clock, **options: object
) -> APNsClient:
    settings: dict[str, object] = {
        "team_id": TEAM_ID,
        "key_id": read_key_id(dev_paths),
        "topic": PASS_TYPE_ID,
        "base_url": server.base_url,
        "ca_file": server.ca_file,
        "clock": clock,
        "trust_env": False,
    }
    settings.update(options)
    return APNsClient.from_key_file(dev_paths["apns_key"], **settings)  # type: ignore[arg-type]


@pytest.fixture
def client(dev_paths: dict[str, Path], server: FakeAPNs, clock: Clock) -> Iterator[APNsClient]:
    with make_client(dev_paths, server, clock) as apns:
        yield apns


def jwt_parts(authorization: str) -> tuple[dict[str, object], dict[str, object]]:
    header, claims, _sig = authorization.removeprefix("bearer ").split(".")

    def decode(part: str) -> dict[str, object]:
        decoded: dict[str, object] = json.loads(
            base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        )
        return decoded

    return decode(header), decode(claims)


def test_pushes_reach_apns_signed_for_the_pass_topic_over_one_connection(
    client: APNsClient, server: FakeAPNs, dev_paths: dict[str, Path]
) -> None:
    results = client.send([TOKEN_A, TOKEN_B, TOKEN_C])

    assert [r.outcome for r in results] == [PushOutcome.DELIVERED] * 3
    assert all(r.status == 200 and r.apns_id for r in results)
    requests = server.requests
    assert [r.path for r in requests] == [f"/3/device/{t}" for t in (TOKEN_A, TOKEN_B, TOKEN_C)]
    for request in requests:
        assert request.method == "POST"
        assert request.status == 200  # the fake verified the ES256 signature
        assert request.headers["apns-topic"] == PASS_TYPE_ID
        assert request.headers["apns-push-type"] == "background"
        assert request.headers["apns-priority"] == "5"
        assert json.loads(request.body) == {"aps": {}}
        header, claims = jwt_parts(request.headers["authorization"])
        assert header == {"alg": "ES256", "kid": read_key_id(dev_paths)}
        assert claims["iss"] == TEAM_ID and isinstance(claims["iat"], int)
    assert server.connections_accepted == 1
    assert {r.connection for r in requests} == {0}


def test_connection_is_reused_across_send_calls(client: APNsClient, server: FakeAPNs) -> None:
    client.send([TOKEN_A])
    client.send([TOKEN_B])
    client.send([TOKEN_C, TOKEN_D])

    assert len(server.requests) == 4
    assert server.connections_accepted == 1


def test_answers_are_classified_per_token(client: APNsClient, server: FakeAPNs) -> None:
    server.script(TOKEN_B, Reply(410, "Unregistered"))
    server.script(TOKEN_C, Reply(500, "InternalServerError"))
    server.script(TOKEN_D, Reply(429, "TooManyRequests", {"retry-after": "120"}))
    server.script("e5" * 32, Reply(400, "BadDeviceToken"))
    server.script("f6" * 32, Reply(503, "ServiceUnavailable"))

    results = client.send([TOKEN_A, TOKEN_B, TOKEN_C, TOKEN_D, "e5" * 32, "f6" * 32])

    assert [(r.outcome, r.status, r.reason) for r in results] == [
        (PushOutcome.DELIVERED, 200, None),
        (PushOutcome.GONE, 410, "Unregistered"),
        (PushOutcome.RETRY, 500, "InternalServerError"),
        (PushOutcome.RETRY, 429, "TooManyRequests"),
        (PushOutcome.REJECTED, 400, "BadDeviceToken"),
        (PushOutcome.RETRY, 503, "ServiceUnavailable"),
    ]
    assert results[3].retry_after == 120.0
    assert results[2].retry_after is None


def test_malformed_token_is_rejected_without_a_request(
    client: APNsClient, server: FakeAPNs
) -> None:
    (result,) = client.send(["../../3/device/evil?x=1"])

    assert result.outcome is PushOutcome.REJECTED
    assert result.reason == "BadDeviceToken"
    assert server.requests == []


def test_provider_token_is_reused_then_refreshed_after_fifty_minutes(
    client: APNsClient, server: FakeAPNs, clock: Clock
) -> None:
    client.send([TOKEN_A])
    clock.advance(49)
    client.send([TOKEN_A])
    clock.advance(2)
    client.send([TOKEN_A])

    first, second, third = (r.headers["authorization"] for r in server.requests)
    assert first == second
    assert third != second
    assert jwt_parts(third)[1]["iat"] == int(clock.now)
    assert all(r.status == 200 for r in server.requests)


def test_provider_token_is_never_replaced_twice_within_twenty_minutes() -> None:
    clock = Clock()
    token = ProviderToken(ec.generate_private_key(ec.SECP256R1()), "KEYID12345", TEAM_ID, clock)
    minted = token.current()

    clock.advance(5)
    assert token.refresh_if_allowed() is False
    assert token.current() == minted
    clock.advance(16)
    assert token.refresh_if_allowed() is True
    assert token.current() != minted


def test_expired_provider_token_is_refreshed_and_the_push_retried(
    client: APNsClient, server: FakeAPNs, clock: Clock
) -> None:
    client.send([TOKEN_A])
    clock.advance(25)
    server.script(TOKEN_B, Reply(403, "ExpiredProviderToken"), Reply(200))

    (result,) = client.send([TOKEN_B])

    assert result.outcome is PushOutcome.DELIVERED
    tokens = [r.headers["authorization"] for r in server.requests]
    assert tokens[0] == tokens[1] != tokens[2]


def test_push_signed_with_another_key_is_rejected_by_apns(
    dev_paths: dict[str, Path], server: FakeAPNs, clock: Clock
) -> None:
    impostor = ec.generate_private_key(ec.SECP256R1())
    with APNsClient(
        team_id=TEAM_ID,
        key_id=read_key_id(dev_paths),
        signing_key=impostor,
        topic=PASS_TYPE_ID,
        base_url=server.base_url,
        ca_file=server.ca_file,
        clock=clock,
        trust_env=False,
    ) as apns:
        (result,) = apns.send([TOKEN_A])

    assert result.outcome is PushOutcome.REJECTED
    assert (result.status, result.reason) == (403, "InvalidProviderToken")


def test_push_for_another_topic_is_rejected(
    dev_paths: dict[str, Path], server: FakeAPNs, clock: Clock
) -> None:
    with make_client(dev_paths, server, clock, topic="pass.com.example.other") as apns:
        (result,) = apns.send([TOKEN_A])

    assert (result.outcome, result.status, result.reason) == (
        PushOutcome.REJECTED,
        400,
        "TopicDisallowed",
    )


def test_unreachable_gateway_means_retry(
    dev_paths: dict[str, Path], server: FakeAPNs, clock: Clock
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        closed_port = probe.getsockname()[1]
    with make_client(dev_paths, server, clock, base_url=f"https://127.0.0.1:{closed_port}") as apns:
        results = apns.send([TOKEN_A, TOKEN_B])

    assert [r.outcome for r in results] == [PushOutcome.RETRY] * 2
    assert all("connection error" in (r.reason or "") for r in results)


def test_stalled_stream_times_out_as_retry_and_later_pushes_still_go_out(
    dev_paths: dict[str, Path], server: FakeAPNs, clock: Clock
) -> None:
    server.script(TOKEN_B, Reply(stall=True))
    with make_client(dev_paths, server, clock, timeout=httpx.Timeout(0.3)) as apns:
        results = apns.send([TOKEN_A, TOKEN_B, TOKEN_C])

    assert [r.outcome for r in results] == [
        PushOutcome.DELIVERED,
        PushOutcome.RETRY,
        PushOutcome.DELIVERED,
    ]
    assert "timeout" in (results[1].reason or "")


def test_untrusted_gateway_certificate_is_not_accepted(
    dev_paths: dict[str, Path], server: FakeAPNs, clock: Clock
) -> None:
    with make_client(dev_paths, server, clock, ca_file=None) as apns:
        (result,) = apns.send([TOKEN_A])

    assert result.outcome is PushOutcome.RETRY
    assert server.requests == []
