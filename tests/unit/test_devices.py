"""Sessions on the account page are named as their owner would recognise them."""

from __future__ import annotations

import pytest

from portal.web.devices import device_name

AGENTS = {
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "HeadlessChrome/126.0.0.0 Safari/537.36": "Chrome on Linux",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36 Edg/126.0.0.0": "Edge on Windows",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1": "Safari on iPhone",
    "Mozilla/5.0 (Android 14; Mobile; rv:128.0) Gecko/128.0 Firefox/128.0":
        "Firefox on Android",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.5 Safari/605.1.15": "Safari on Mac",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "SamsungBrowser/25.0 Chrome/121.0.0.0 Mobile Safari/537.36": "Samsung Internet on Android",
    "curl/8.5.0": "Unknown browser",
    "": "Unknown browser",
}


@pytest.mark.parametrize(("agent", "name"), AGENTS.items())
def test_a_user_agent_reads_as_browser_on_system(app, agent: str, name: str):
    with app.test_request_context():
        assert device_name(agent) == name


def test_none_and_french(app):
    with app.test_request_context(headers={"Accept-Language": "fr"}):
        assert device_name(None) == "Navigateur inconnu"
        assert device_name(next(iter(AGENTS))) == "Chrome sur Linux"
