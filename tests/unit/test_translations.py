"""Every message the code shows has its French translation, and the catalog file is well
formed (a continuation line without its ``msgid`` is silently dropped by the parser, so the
French page would show English without anything else noticing)."""

from __future__ import annotations

from pathlib import Path

from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

ROOT = Path(__file__).resolve().parents[2]
PO = ROOT / "translations" / "fr" / "LC_MESSAGES" / "messages.po"
KEYWORDS = {"_": None, "gettext": None, "ngettext": (1, 2), "lazy_gettext": None, "_l": None}


def code_messages() -> set[str]:
    found: set[str] = set()
    for folder, method in (("portal", "python"), ("templates", "jinja2")):
        pattern = "**.py" if method == "python" else "**.html"
        for _, _, message, _, _ in extract_from_dir(
                ROOT / folder, method_map=[(pattern, method), ("**.txt", method)],
                keywords=KEYWORDS):
            found.add(message[0] if isinstance(message, tuple) else message)
    return found


def test_every_message_in_the_code_is_translated_to_french() -> None:
    with PO.open("rb") as handle:
        catalog = read_po(handle)
    missing = sorted(m for m in code_messages() if m and not (
        catalog.get(m) is not None and catalog.get(m).string))
    assert missing == []


def test_the_french_catalog_has_no_orphan_lines() -> None:
    lines = PO.read_text(encoding="utf-8").splitlines()
    orphans = [n + 1 for n, line in enumerate(lines)
               if line.startswith('"') and n > 0 and not lines[n - 1].strip()]
    assert orphans == []
