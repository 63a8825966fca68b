"""A live Carnet on a fresh database per test, and a real Chromium driven by Playwright.

Every page a test visits is checked with axe-core (WCAG 2.2 A and AA, and axe's best
practices), and a violation fails the test:

- the live server keeps each HTML document it answers to a browser's navigation (GET or a
  form's POST, errors included); when the test ends, each is opened again, as it was served
  (same URL, same headers, so the same Content-Security-Policy), with its scripts held back,
  and checked: the page as it works without JavaScript;
- the document each page shows when the test ends is checked as it is, scripts and all;
- a test checks a state that scripts made, in between, with :func:`assert_accessible`.

axe is evaluated through the DevTools protocol, which the page's Content-Security-Policy does
not govern: the policy stays as in production (``bypass_csp`` would hide an inline script or
style that it blocks), and no inline ``<script>`` is added that it would refuse."""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from playwright.sync_api import Browser, BrowserContext, Page, Route, sync_playwright
from werkzeug.serving import make_server

from portal import create_app
from portal.core.db import get_engine
from tests.conftest import Outbox, app_config, prepare_schema
from tests.support.databases import KINDS, fresh_database

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
# Installed from npm by `make test` (git-ignored).
AXE = Path(__file__).parent / ".node" / "node_modules" / "axe-core" / "axe.min.js"
AXE_INSTALL = "npm install --prefix tests/browser/.node --no-audit --no-fund axe-core@4"
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"]
RUN_AXE = """async (tags) => {
  if (!/^https?:$/.test(location.protocol) || document.contentType !== 'text/html') return null;
  const result = await axe.run(document, {runOnly: {type: 'tag', values: tags},
                                          resultTypes: ['violations']});
  return result.violations.map(v => ({
    id: v.id, impact: v.impact, help: v.help,
    targets: v.nodes.map(n => n.target.join(' ')),
  }));
}"""


@dataclass(frozen=True)
class Document:
    """An HTML page the live server answered to a browser's navigation."""

    method: str
    path: str
    status: str
    headers: list[tuple[str, str]]
    body: bytes

    def key(self) -> str:
        """Alike pages differ only in their CSRF tokens: one check for them all."""
        body = re.sub(rb'value="[^"]{40,}"', b"", self.body)
        return hashlib.sha256(self.path.encode() + self.status.encode() + body).hexdigest()


@dataclass
class LiveServer:
    app: Flask
    url: str
    outbox: Outbox
    documents: list[Document] = field(default_factory=list)


def keeping_documents(app: Any, documents: list[Document]) -> Any:
    """The WSGI app, keeping each successful HTML answer to a navigation in ``documents``."""

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("HTTP_SEC_FETCH_DEST") != "document":
            return app(environ, start_response)  # type: ignore[no-any-return]
        answer: dict[str, Any] = {}

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            answer.update(status=status, headers=headers)
            return start_response(status, headers, exc_info)

        chunks = app(environ, start)
        try:
            body = b"".join(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
        content_type = dict((k.lower(), v) for k, v in answer["headers"]).get("content-type", "")
        if content_type.startswith("text/html") and not answer["status"].startswith("3"):
            path = environ.get("PATH_INFO", "/")
            if environ.get("QUERY_STRING"):
                path += "?" + environ["QUERY_STRING"]
            documents.append(Document(environ["REQUEST_METHOD"], path, answer["status"],
                                      list(answer["headers"]), body))
        return [body]

    return wsgi


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
        documents: list[Document] = []
        server = make_server("127.0.0.1", 0, keeping_documents(app, documents), threaded=True)
        base = f"http://127.0.0.1:{server.server_port}"
        app.config["BASE_URL"] = base
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield LiveServer(app, base, Outbox(Path(app.instance_path) / "outbox"), documents)
        finally:
            server.shutdown()
            thread.join(timeout=10)
            engine.dispose()


def axe_source() -> str:
    if not AXE.exists():
        pytest.fail(f"axe-core is missing: run `make test`, or `{AXE_INSTALL}`", pytrace=False)
    return AXE.read_text()


def axe_violations(page: Page) -> list[str]:
    """The current document's violations, one readable line each (none for a page that is
    not HTML: a download, a JSON answer, about:blank)."""
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.evaluate(axe_source())
    found = page.evaluate(RUN_AXE, AXE_TAGS)
    return [f"{v['id']} ({v['impact']}): {v['help']} at {', '.join(v['targets'])}"
            for v in found or []]


def assert_accessible(page: Page) -> None:
    """Fail now if the current document, as it is, has an axe violation."""
    lines = axe_violations(page)
    assert not lines, f"axe-core on {page.url}:\n  " + "\n  ".join(lines)


def check_served_documents(browser: Browser, live: LiveServer) -> dict[str, list[str]]:
    """Open each page the server answered again, as served, scripts held back, and check it."""
    found: dict[str, list[str]] = {}
    seen: set[str] = set()
    context = browser.new_context(locale="en-GB", viewport={"width": 390, "height": 844},
                                  service_workers="block")
    try:
        checker = context.new_page()
        served: list[Document] = []

        def replay(route: Route) -> None:
            request = route.request
            if request.is_navigation_request():
                document = served[-1]
                route.fulfill(status=int(document.status.split()[0]), body=document.body,
                              headers={k: v for k, v in document.headers
                                       if k.lower() not in ("set-cookie", "content-length")})
            elif request.resource_type == "script":
                route.abort()
            else:
                route.fallback()

        checker.route("**/*", replay)
        for document in list(live.documents):
            if document.key() in seen:
                continue
            seen.add(document.key())
            served.append(document)
            checker.goto(live.url + document.path.split("?")[0])
            lines = axe_violations(checker)
            if lines:
                found[f"{document.method} {document.path} ({document.status})"] = lines
    finally:
        context.close()
    return found


@pytest.fixture
def new_page(browser: Browser, live: LiveServer) -> Iterator[Callable[..., Page]]:
    """Opens a page in a new browser context (its own cookies); phone-sized and in English
    unless told. Every page it visits is checked by axe (see this module's docstring)."""
    axe_source()
    contexts: list[BrowserContext] = []
    pages: list[Page] = []

    def open_page(locale: str = "en-GB", width: int = 390, height: int = 844,
                  user_agent: str | None = None) -> Page:
        options: dict[str, Any] = {"locale": locale, "base_url": live.url,
                                   "viewport": {"width": width, "height": height}}
        if user_agent is not None:
            options["user_agent"] = user_agent
        context = browser.new_context(**options)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        pages.append(page)
        return page

    yield open_page
    try:
        found: dict[str, list[str]] = {}
        for page in pages:
            lines = axe_violations(page)
            if lines:
                found[f"{page.url} as the test left it"] = lines
        found.update(check_served_documents(browser, live))
    finally:
        for context in contexts:
            context.close()
    if found:
        pytest.fail("axe-core found violations on pages this test visited:\n" + "\n".join(
            f"{where}:\n  " + "\n  ".join(lines) for where, lines in found.items()),
            pytrace=False)


@pytest.fixture
def page(new_page: Callable[..., Page]) -> Page:
    return new_page()
