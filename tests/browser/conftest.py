"""A live Carnet on a fresh database per test, and a real Chromium driven by Playwright."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from playwright.sync_api import Browser, Page, sync_playwright
from werkzeug.serving import make_server

from portal import create_app
from portal.core.db import get_engine
from tests.conftest import Outbox, app_config, prepare_schema
from tests.support.databases import KINDS, fresh_database

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")


@dataclass
class LiveServer:
    app: Flask
    url: str
    outbox: Outbox


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        yield browser
        browser.close()


@pytest.fixture(params=KINDS)
def live(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveServer]:
    with fresh_database(request.param, tmp_path) as url:
        app = create_app(app_config(tmp_path, DATABASE_URL=url, BASE_URL="http://placeholder"))
        engine: Any = get_engine(app)
        prepare_schema(engine)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        base = f"http://127.0.0.1:{server.server_port}"
        app.config["BASE_URL"] = base
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield LiveServer(app, base, Outbox(Path(app.instance_path) / "outbox"))
        finally:
            server.shutdown()
            thread.join(timeout=10)
            engine.dispose()


@pytest.fixture
def page(browser: Browser, live: LiveServer) -> Iterator[Page]:
    context = browser.new_context(locale="en-GB", base_url=live.url,
                                  viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()
