"""QR codes of a member number, for web pages and e-mails.

The wallet card carries its own QR (Wallet draws it from ``barcodes``); these helpers give
the same code to members who have no wallet app: an inline SVG for the portal (crisp at any
zoom, no extra request, no ``<img>`` to allow in the CSP) and a PNG for e-mail clients that
do not render SVG.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import qrcode
import qrcode.constants
from qrcode.image.pil import PilImage
from qrcode.image.svg import SvgPathFillImage

# Medium error correction survives a scratched phone screen or a slightly blurred print
# without making the code much denser than needed for a short member number.
_ERROR_CORRECTION = qrcode.constants.ERROR_CORRECT_M


def _code(text: str, box_size: int, border: int) -> qrcode.QRCode:
    if not text:
        raise ValueError("cannot encode an empty text as a QR code")
    if box_size < 1 or border < 0:
        raise ValueError("box_size must be ≥ 1 and border ≥ 0")
    code = qrcode.QRCode(error_correction=_ERROR_CORRECTION, box_size=box_size, border=border)
    code.add_data(text)
    code.make(fit=True)
    return code


def qr_svg(text: str, *, border: int = 4, label: str | None = None) -> str:
    """Return an inline ``<svg>`` element (no XML declaration) encoding ``text``.

    The element has a ``viewBox`` but no fixed width/height so CSS sizes it, a white
    background so it scans on dark themes, and ``role="img"`` with an accessible name
    (``label``, defaulting to the encoded text) for screen readers.
    """
    code = _code(text, 10, border)
    image = code.make_image(image_factory=SvgPathFillImage)
    root: ET.Element = image.get_image()
    root.attrib.pop("width", None)
    root.attrib.pop("height", None)
    root.set("role", "img")
    root.set("aria-label", label if label is not None else text)
    root.set("shape-rendering", "crispEdges")
    return ET.tostring(root, encoding="unicode")


def qr_png(text: str, box_size: int = 10, *, border: int = 4) -> bytes:
    """Return a black-on-white PNG encoding ``text``, ``box_size`` pixels per module."""
    code = _code(text, box_size, border)
    image = code.make_image(image_factory=PilImage)
    out = io.BytesIO()
    image.save(out)
    return out.getvalue()
