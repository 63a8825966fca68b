"""The PassKit web service driven exactly as a device drives it, the member's download, and
the update path: a points change → a new update tag → a push through (fake) APNs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask
from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from passes.devcerts import read_key_id
from portal import create_app
from portal.loyalty import ledger
from portal.loyalty.program import load_program
from portal.models.customer import Customer
from portal.models.wallet import AppleDeviceRegistration, ApplePass, ApplePush
from portal.outbox.worker import run_once
from portal.wallet_ws.issuer import apple_wallet
from tests.conftest import CATALOG, app_config, path_of, submit
from tests.support.apple_wallet import (
    PASS_TYPE_ID,
    TEAM_ID,
    assert_valid_pass,
    dev_credentials,
    strings_of,
    unpack,
    wallet_settings,
)
from tests.support.fake_apns import FakeAPNs, Reply

PROGRAM = load_program(CATALOG)
assert PROGRAM is not None
DEVICE = "6a44f1a5ca4a6f6a0ed5c8d1d7b7fe0b"
OTHER_DEVICE = "0f9e8d7c6b5a49382716f5e4d3c2b1a0"
PUSH_TOKEN = "a1" * 32
OTHER_TOKEN = "b2" * 32
BASE = "/wallet/apple/v1"
PKPASS = "application/vnd.apple.pkpass"


@pytest.fixture(scope="module")
def dev_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return dev_credentials(tmp_path_factory.mktemp("apple"))


@pytest.fixture
def apns(dev_paths: dict[str, Path], tmp_path: Path) -> Iterator[FakeAPNs]:
    key = serialization.load_pem_private_key(dev_paths["apns_key"].read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    with FakeAPNs(directory=tmp_path / "apns", team_id=TEAM_ID, key_id=read_key_id(dev_paths),
                  public_key=key.public_key(), topic=PASS_TYPE_ID) as fake:
        yield fake


@pytest.fixture
def app(connection: Connection, tmp_path: Path, dev_paths: dict[str, Path],
        apns: FakeAPNs) -> Iterator[Flask]:
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection, **wallet_settings(dev_paths),
                                APNS_URL=apns.base_url, APNS_CA_FILE=str(apns.ca_file)))
    yield app
    apple_wallet(app).close()


def sign_up_and_join(client: Any, outbox: Any, email: str = "lea@example.com") -> None:
    submit(client, "/signup", {"email": email, "password": "correct horse 1",
                               "confirm": "correct horse 1"})
    client.get(path_of(outbox.link(to=email, contains="/verify/")))
    submit(client, "/loyalty", {"accept": "y", "terms_version": str(PROGRAM.terms.version)},
           action="/loyalty/join")


def member_of(session: Any, email: str = "lea@example.com") -> Any:
    customer = session.scalars(select(Customer).where(Customer.email == email)).one()
    return ledger.member_for(session, customer)


@pytest.fixture
def issued(client, outbox, session, dev_paths, tmp_path) -> dict[str, Any]:
    """A member who downloaded their card from the loyalty page: its pass.json."""
    sign_up_and_join(client, outbox)
    response = client.get("/loyalty/wallet/apple.pkpass")
    assert response.status_code == 200
    assert response.mimetype == PKPASS
    assert response.headers["Content-Disposition"] == "attachment; filename=carnet.pkpass"
    return assert_valid_pass(response.data, dev_paths["ca_bundle"], tmp_path / "download")


def auth(document: dict[str, Any], token: str | None = None) -> dict[str, str]:
    return {"Authorization": f"ApplePass {token or document['authenticationToken']}"}


def registration_url(document: dict[str, Any], device: str = DEVICE) -> str:
    return f"{BASE}/devices/{device}/registrations/{PASS_TYPE_ID}/{document['serialNumber']}"


def pass_url(document: dict[str, Any]) -> str:
    return f"{BASE}/passes/{PASS_TYPE_ID}/{document['serialNumber']}"


def register(client, document, device=DEVICE, token=PUSH_TOKEN, **kwargs):
    return client.post(registration_url(document, device), json={"pushToken": token},
                       headers=auth(document), **kwargs)


def serials(client, device=DEVICE, since=None):
    query = {"passesUpdatedSince": since} if since is not None else {}
    return client.get(f"{BASE}/devices/{device}/registrations/{PASS_TYPE_ID}",
                      query_string=query)


# --- the download -----------------------------------------------------------------------------


def test_the_downloaded_card_points_at_this_web_service_with_a_long_token(issued, session):
    member = member_of(session)
    assert issued["passTypeIdentifier"] == PASS_TYPE_ID and issued["teamIdentifier"] == TEAM_ID
    assert issued["webServiceURL"] == "http://localhost/wallet/apple"
    assert len(issued["authenticationToken"]) >= 16
    assert issued["barcodes"][0]["message"] == member.member_number
    assert issued["storeCard"]["primaryFields"][0]["value"] == 0


def test_the_badge_links_to_the_card_and_only_members_get_one(client, outbox):
    submit(client, "/signup", {"email": "max@example.com", "password": "correct horse 1",
                               "confirm": "correct horse 1"})
    client.get(path_of(outbox.link(contains="/verify/")))
    assert client.get("/loyalty/wallet/apple.pkpass").status_code == 404  # not a member
    submit(client, "/loyalty", {"accept": "y", "terms_version": str(PROGRAM.terms.version)},
           action="/loyalty/join")
    page = client.get("/loyalty").get_data(as_text=True)
    badge = page.split('id="wallet-buttons"', 1)[1].split("</div>", 1)[0]
    assert 'href="/loyalty/wallet/apple.pkpass"' in badge
    assert 'alt="Add to Apple Wallet"' in badge and "add-to-apple-wallet-en.svg" in badge
    svg = client.get("/static/img/wallet/add-to-apple-wallet-en.svg")
    assert svg.status_code == 200 and b"Apple Wallet" in svg.data
    svg.close()

    anonymous = client.application.test_client().get("/loyalty/wallet/apple.pkpass")
    assert anonymous.status_code == 302 and "/login" in anonymous.headers["Location"]


def test_downloading_twice_gives_the_same_card(client, issued, dev_paths, tmp_path):
    again = assert_valid_pass(client.get("/loyalty/wallet/apple.pkpass").data,
                              dev_paths["ca_bundle"], tmp_path / "again")
    assert again["serialNumber"] == issued["serialNumber"]
    assert again["authenticationToken"] == issued["authenticationToken"]


# --- the web service, as a device -------------------------------------------------------------


def test_registration_is_201_then_200_and_needs_the_token(client, issued, session):
    assert register(client, issued).status_code == 201
    assert register(client, issued).status_code == 200
    wrong = client.post(registration_url(issued), json={"pushToken": PUSH_TOKEN},
                        headers=auth(issued, "x" * 43))
    assert wrong.status_code == 401
    missing = client.post(registration_url(issued), json={"pushToken": PUSH_TOKEN})
    assert missing.status_code == 401
    [registration] = session.scalars(select(AppleDeviceRegistration)).all()
    assert (registration.device_library_identifier, registration.push_token) == (DEVICE,
                                                                                 PUSH_TOKEN)


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b"{}", b'{"pushToken": 42}', b'{"pushToken": "not-hex!"}',
    b'{"pushToken": "' + b"a" * 300 + b'"}',
])
def test_a_malformed_registration_body_is_400(client, issued, body):
    response = client.post(registration_url(issued), data=body,
                           content_type="application/json", headers=auth(issued))
    assert response.status_code == 400


def test_malformed_paths_are_400_and_unknown_ones_404(client, issued):
    serial = issued["serialNumber"]
    bad_device = f"{BASE}/devices/{'x' * 200}/registrations/{PASS_TYPE_ID}/{serial}"
    assert client.post(bad_device, json={"pushToken": PUSH_TOKEN},
                       headers=auth(issued)).status_code == 400
    bad_serial = f"{BASE}/passes/{PASS_TYPE_ID}/{'s' * 65}"
    assert client.get(bad_serial, headers=auth(issued)).status_code == 400
    bad_type = f"{BASE}/passes/not-a-pass-type/{serial}"
    assert client.get(bad_type, headers=auth(issued)).status_code == 400
    other_type = f"{BASE}/passes/pass.com.example.other/{serial}"
    assert client.get(other_type, headers=auth(issued)).status_code == 404
    unknown = f"{BASE}/passes/{PASS_TYPE_ID}/{'0' * 32}"
    assert client.get(unknown, headers=auth(issued)).status_code == 404
    assert client.get(f"{BASE}/devices/{DEVICE}/registrations/pass.com.example.other"
                      ).status_code == 404


def test_updated_serials_are_listed_with_a_string_tag_then_204(client, issued):
    assert serials(client).status_code == 204  # not registered yet
    register(client, issued)
    listed = serials(client)
    assert listed.status_code == 200
    body = listed.get_json()
    assert body["serialNumbers"] == [issued["serialNumber"]]
    assert isinstance(body["lastUpdated"], str)
    assert serials(client, since=body["lastUpdated"]).status_code == 204
    assert serials(client, since="last tuesday").status_code == 400
    assert serials(client, device=OTHER_DEVICE).status_code == 204


def test_the_latest_card_has_last_modified_and_honours_if_modified_since(client, issued,
                                                                          dev_paths, tmp_path):
    url = pass_url(issued)
    assert client.get(url).status_code == 401
    assert client.get(url, headers=auth(issued, "y" * 43)).status_code == 401
    latest = client.get(url, headers=auth(issued))
    assert latest.status_code == 200 and latest.mimetype == PKPASS
    modified = latest.headers["Last-Modified"]
    again = assert_valid_pass(latest.data, dev_paths["ca_bundle"], tmp_path / "latest")
    assert again["serialNumber"] == issued["serialNumber"]
    unchanged = client.get(url, headers={**auth(issued), "If-Modified-Since": modified})
    assert unchanged.status_code == 304 and unchanged.data == b""


def test_unregistering_needs_the_token_and_stops_updates(client, issued, session):
    register(client, issued)
    url = registration_url(issued)
    assert client.delete(url, headers=auth(issued, "z" * 43)).status_code == 401
    assert client.delete(url, headers=auth(issued)).status_code == 200
    assert session.scalars(select(AppleDeviceRegistration)).all() == []
    assert serials(client).status_code == 204


def test_device_logs_are_accepted(client, caplog):
    caplog.set_level("INFO", logger="carnet.wallet.apple.device")
    ok = client.post(f"{BASE}/log", json={"logs": ["Web service error for pass.dev: 500"]})
    assert ok.status_code == 200
    assert "Web service error for pass.dev: 500" in caplog.text
    assert client.post(f"{BASE}/log", json={"logs": "not a list"}).status_code == 400
    assert client.post(f"{BASE}/log", data=b"{", content_type="application/json"
                       ).status_code == 400


def test_device_logs_cannot_forge_log_lines(client, caplog):
    caplog.set_level("INFO")
    forged = ("Web service error\nINFO:carnet.api:key revoked by admin\r\x1b[2K"
              "\u2028WARNING:carnet.errors:forged\u202e")
    ok = client.post(f"{BASE}/log", json={"logs": [forged]})
    assert ok.status_code == 200  # what Apple's devices expect for a well-formed body
    device = [r.getMessage() for r in caplog.records
              if r.name == "carnet.wallet.apple.device"]
    assert len(device) == 1
    assert "\n" not in device[0] and "\r" not in device[0] and "\x1b" not in device[0]
    assert "\u2028" not in device[0] and "\u202e" not in device[0]
    assert device[0].startswith("device: Web service error\\u000aINFO:carnet.api:key")
    # the whole captured text has exactly the one line the device sent
    assert caplog.text.count("carnet.api:key revoked") == 1
    assert not any(line.startswith("INFO:carnet.api") for line in caplog.text.splitlines())


def test_device_logs_are_capped_in_size_and_count(client, caplog):
    caplog.set_level("INFO", logger="carnet.wallet.apple.device")
    lines = [f"line {i} " + "x" * 1000 for i in range(60)]  # about 60 kB
    assert client.post(f"{BASE}/log", json={"logs": lines}).status_code == 200
    device = [r.getMessage() for r in caplog.records
              if r.name == "carnet.wallet.apple.device"]
    assert max(len(line) for line in device) <= len("device: ") + 500
    assert sum(line.startswith("device: line ") for line in device) == 50
    huge = client.post(f"{BASE}/log", json={"logs": lines * 20})  # about 1 MB
    assert huge.status_code == 413


def test_device_logs_are_rate_limited_per_address(client, caplog):
    caplog.set_level("INFO", logger="carnet.wallet.apple.device")
    limit = int(client.application.config["DEVICE_LOG_RATE_LIMIT"].split("/")[0])
    here = {"REMOTE_ADDR": "203.0.113.9"}
    for n in range(limit):
        assert client.post(f"{BASE}/log", json={"logs": [f"n{n}"]},
                           environ_base=here).status_code == 200
    refused = client.post(f"{BASE}/log", json={"logs": ["flood"]}, environ_base=here)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
    assert "flood" not in caplog.text
    # another device is not held back by that one
    assert client.post(f"{BASE}/log", json={"logs": ["other"]},
                       environ_base={"REMOTE_ADDR": "203.0.113.10"}).status_code == 200


def test_the_web_service_needs_no_csrf_token(client, issued):
    # The portal's forms are CSRF-protected in these tests; a device has no token to send.
    assert client.post("/loyalty/join", data={"accept": "y"}).status_code == 400
    assert register(client, issued).status_code == 201


# --- staying up to date -----------------------------------------------------------------------


def follow_and_push(app: Flask) -> dict[str, Any]:
    return run_once(app, ["wallet.apple.follow", "wallet.apple.push"])


def earn(session: Any, points: int, ref: str) -> None:
    ledger.earn(session, PROGRAM, member_of(session), points, reason=f"Order {ref}",
                actor="test", source_ref=ref)
    session.flush()


def test_points_change_advances_the_tag_pushes_and_the_device_gets_the_new_card(
        app, client, issued, session, apns, dev_paths, tmp_path):
    # On PostgreSQL the consumer starts behind every transaction still running when the
    # first card was issued (here: the test's own), so it may see the enrollment once.
    follow_and_push(app)
    register(client, issued)
    register(client, issued, device=OTHER_DEVICE, token=OTHER_TOKEN)
    tag = serials(client).get_json()["lastUpdated"]
    modified = client.get(pass_url(issued), headers=auth(issued)).headers["Last-Modified"]
    follow_and_push(app)
    assert apns.requests == []  # nothing changed yet

    earn(session, 1500, "A-1")  # points, and Silver
    outcome = follow_and_push(app)
    assert outcome["wallet.apple.follow"] == 1
    assert outcome["wallet.apple.push"]["delivered"] == 2
    pushed = sorted(apns.requests, key=lambda r: r.device_token)
    assert [r.device_token for r in pushed] == [PUSH_TOKEN, OTHER_TOKEN]
    for request in pushed:
        assert request.status == 200 and request.method == "POST"
        assert request.headers["apns-topic"] == PASS_TYPE_ID
        assert request.headers["apns-push-type"] == "background"
        assert json.loads(request.body) == {"aps": {}}
        assert request.jwt_header == {"alg": "ES256", "kid": read_key_id(dev_paths)}
        assert request.jwt_claims is not None and request.jwt_claims["iss"] == TEAM_ID
    assert session.scalars(select(ApplePush)).all() == []

    # The device asks what changed, then fetches the card it had.
    listed = serials(client, since=tag)
    assert listed.status_code == 200
    assert listed.get_json()["serialNumbers"] == [issued["serialNumber"]]
    assert listed.get_json()["lastUpdated"] != tag
    fresh = client.get(pass_url(issued), headers={**auth(issued), "If-Modified-Since": modified})
    assert fresh.status_code == 200
    document = assert_valid_pass(fresh.data, dev_paths["ca_bundle"], tmp_path / "fresh")
    assert document["storeCard"]["primaryFields"][0]["value"] == 1500
    tier = document["storeCard"]["secondaryFields"][0]["value"]
    assert strings_of(unpack(fresh.data), "en")[tier] == "Silver"
    assert strings_of(unpack(fresh.data), "fr")[tier] == "Argent"
    assert serials(client, since=listed.get_json()["lastUpdated"]).status_code == 204

    follow_and_push(app)  # nothing new: no second push
    assert len(apns.requests) == 2


def test_gone_devices_are_unregistered_and_failures_retried_later(app, client, issued,
                                                                  session, apns):
    register(client, issued)
    register(client, issued, device=OTHER_DEVICE, token=OTHER_TOKEN)
    apns.script(PUSH_TOKEN, Reply(410, "Unregistered"))
    apns.script(OTHER_TOKEN, Reply(500, "InternalServerError"), Reply(200))
    earn(session, 100, "B-1")
    outcome = follow_and_push(app)["wallet.apple.push"]
    assert outcome["unregistered"] == 1 and outcome["retrying"] == 1
    [left] = session.scalars(select(AppleDeviceRegistration)).all()
    assert left.device_library_identifier == OTHER_DEVICE
    [retry] = session.scalars(select(ApplePush).execution_options(populate_existing=True)).all()
    assert retry.attempts == 1 and retry.last_error == "500 InternalServerError"

    follow_and_push(app)  # backing off: not sent again yet
    assert len(apns.requests) == 2
    session.execute(update(ApplePush).values(next_attempt_at=retry.next_attempt_at
                                             - timedelta(hours=1)))
    session.flush()
    assert follow_and_push(app)["wallet.apple.push"]["delivered"] == 1
    assert [r.device_token for r in apns.requests][-1] == OTHER_TOKEN
    assert session.scalars(select(ApplePush)).all() == []


def test_a_push_claimed_by_a_worker_that_died_is_sent_again(app, client, issued, session, apns):
    from portal.services import wallet_apple_sync as sync

    register(client, issued)
    earn(session, 100, "C-1")
    run_once(app, ["wallet.apple.follow"])
    claimed = sync.claim_pushes(session, sync.PushPolicy(lease_seconds=60))  # then "killed"
    session.flush()
    assert len(claimed) == 1
    follow_and_push(app)
    assert apns.requests == []  # leased by the dead worker
    session.execute(update(ApplePush).values(leased_until=None))
    session.flush()
    follow_and_push(app)
    assert [r.device_token for r in apns.requests] == [PUSH_TOKEN]


def test_the_card_keeps_its_serial_and_token_across_updates(app, client, issued, session,
                                                           dev_paths, tmp_path):
    earn(session, 50, "D-1")
    run_once(app, ["wallet.apple.follow"])
    latest = client.get(pass_url(issued), headers=auth(issued))
    document = assert_valid_pass(latest.data, dev_paths["ca_bundle"], tmp_path / "latest")
    assert document["storeCard"]["primaryFields"][0]["value"] == 50
    assert document["serialNumber"] == issued["serialNumber"]
    assert document["authenticationToken"] == issued["authenticationToken"]
    assert session.scalars(select(ApplePass)).one().serial_number == issued["serialNumber"]


def test_dev_credentials_command_creates_the_kit_once(connection, tmp_path):
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection))
    wallet = apple_wallet(app)
    assert not wallet.available  # nothing under instance/ yet: no badge, no download
    runner = app.test_cli_runner()
    first = runner.invoke(args=["wallet", "dev-credentials"])
    assert first.exit_code == 0, first.output
    assert wallet.available and wallet.can_push
    certificate = Path(wallet.paths().certificate).read_bytes()  # type: ignore[arg-type]
    google = Path(app.instance_path) / "wallet" / "google" / "service-account.json"
    assert json.loads(google.read_text())["type"] == "service_account"
    second = runner.invoke(args=["wallet", "dev-credentials"])
    assert second.exit_code == 0, second.output
    assert Path(wallet.paths().certificate).read_bytes() == certificate  # type: ignore[arg-type]
