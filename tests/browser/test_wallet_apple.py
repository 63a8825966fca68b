"""A member adds their loyalty card to Apple Wallet from the loyalty page, in Chromium."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import LiveServer
from tests.browser.test_portal import sign_up_and_verify
from tests.support.apple_wallet import (
    PASS_TYPE_ID,
    assert_valid_pass,
    dev_credentials,
    unpack,
    wallet_settings,
)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def dev_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return dev_credentials(tmp_path_factory.mktemp("apple"))


def test_the_member_clicks_the_badge_and_gets_a_valid_signed_card(
        page: Page, live: LiveServer, dev_paths: dict[str, Path], tmp_path: Path):
    live.app.config.update(wallet_settings(dev_paths))
    sign_up_and_verify(page, live, "nour@example.com")
    page.goto("/loyalty")
    page.get_by_label("I accept the programme terms above.").check()
    page.get_by_role("button", name="Join Carnet Rewards").click()
    badge = page.locator("#wallet-buttons").get_by_role("link", name="Add to Apple Wallet")
    expect(badge).to_be_visible()
    artwork = badge.locator("img")
    box = artwork.bounding_box()
    assert box is not None and box["height"] >= 40  # not shrunk below a tappable size
    # The badge artwork actually loaded (a broken image has no natural width).
    assert artwork.evaluate("img => img.complete && img.naturalWidth > 0")
    artwork.screenshot(path=str(tmp_path / "badge.png"))

    with page.expect_download() as info:
        badge.click()
    download = info.value
    assert download.suggested_filename == "carnet.pkpass"
    data = Path(download.path()).read_bytes()
    document = assert_valid_pass(data, dev_paths["ca_bundle"], tmp_path)
    assert document["passTypeIdentifier"] == PASS_TYPE_ID
    assert document["webServiceURL"] == f"{live.url}/wallet/apple"
    number = page.locator(".loyalty-number").inner_text()
    assert document["barcodes"][0]["message"] == number
    assert {"en.lproj/pass.strings", "fr.lproj/pass.strings"} <= set(unpack(data))
