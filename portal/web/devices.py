"""A signed-in session named as its owner would recognise it ("Firefox on Android"), from the
browser's User-Agent header, for the list of sessions on the account page. A rough reading is
enough: the name only helps to tell one's own devices apart, it proves nothing."""

from __future__ import annotations

import re

from flask_babel import gettext as _

# First match wins: Edge and Opera also say "Chrome", Chrome also says "Safari".
BROWSERS = (
    (re.compile(r"\bEdg(e|A|iOS)?/"), "Edge"),
    (re.compile(r"\b(OPR|Opera)/"), "Opera"),
    (re.compile(r"\bSamsungBrowser/"), "Samsung Internet"),
    (re.compile(r"\b(Firefox|FxiOS)/"), "Firefox"),
    (re.compile(r"\b(HeadlessChrome|Chrome|CriOS|Chromium)/"), "Chrome"),
    (re.compile(r"\bVersion/[\d.]+.*\bSafari/"), "Safari"),
)
SYSTEMS = (
    (re.compile(r"\biPhone\b"), "iPhone"),
    (re.compile(r"\biPad\b"), "iPad"),
    (re.compile(r"\bAndroid\b"), "Android"),
    (re.compile(r"\bWindows\b"), "Windows"),
    (re.compile(r"\bCrOS\b"), "ChromeOS"),
    (re.compile(r"\bMac OS X\b|\bMacintosh\b"), "Mac"),
    (re.compile(r"\bLinux\b"), "Linux"),
)


def _first(patterns: tuple[tuple[re.Pattern[str], str], ...], text: str) -> str | None:
    return next((name for pattern, name in patterns if pattern.search(text)), None)


def device_name(user_agent: str | None) -> str:
    """"Chrome on Linux", "Safari on iPhone", "Firefox"; "Unknown browser" when unsure."""
    text = user_agent or ""
    browser, system = _first(BROWSERS, text), _first(SYSTEMS, text)
    if browser and system:
        return _("%(browser)s on %(system)s", browser=browser, system=system)
    return browser or system or _("Unknown browser")
