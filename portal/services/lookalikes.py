"""Addresses that look alike: ``dеmo@example.com`` with a Cyrillic ``е`` reads as
``demo@example.com`` but is another string, so it would become another customer.

NFKC (applied to every address, see :func:`portal.services.accounts.normalize_email`) folds
the compatibility forms (fullwidth ``ｄ``, mathematical ``𝐝``, ligatures). What it leaves are
letters of other scripts drawn like Latin ones; :func:`skeleton` maps the common ones
(Cyrillic, Greek, Armenian and a few Latin variants, from Unicode's UTS #39 confusables) to the
Latin letter they imitate. Only letters that look the same in lower case are listed: the
addresses are compared after lower-casing. The table is deliberately small: a false match
refuses someone's real address, a missed one only lets an unusual duplicate through.
"""

from __future__ import annotations

import unicodedata
from typing import Final

LATIN_LOOKALIKES: Final = str.maketrans({
    # Cyrillic
    "а": "a", "с": "c", "ԁ": "d", "е": "e", "һ": "h", "і": "i", "ј": "j", "ӏ": "l",
    "о": "o", "р": "p", "ԛ": "q", "ѕ": "s", "ѵ": "v", "ԝ": "w", "х": "x", "у": "y",
    "ү": "y",
    # Greek
    "α": "a", "ϲ": "c", "ι": "i", "ϳ": "j", "ν": "v", "ο": "o", "ρ": "p",
    "υ": "u", "χ": "x", "γ": "y",
    # Armenian
    "հ": "h", "օ": "o", "զ": "q", "ս": "u", "ց": "g",
    # Latin letters drawn like plain ones
    "ı": "i", "ɩ": "i", "ɑ": "a", "ɡ": "g", "ɒ": "a", "ʏ": "y",
})


def skeleton(address: str) -> str:
    """What ``address`` looks like: NFKC, lower case, look-alike letters as Latin ones. Two
    addresses with the same skeleton are hard to tell apart on screen."""
    return unicodedata.normalize("NFKC", address).lower().translate(LATIN_LOOKALIKES)


def is_lookalike(address: str) -> bool:
    """Whether ``address`` (normalized) holds letters that imitate others."""
    return skeleton(address) != address
