"""Default artwork for Apple Wallet passes, and the PNG checks the pass builder relies on.

Wallet refuses a pass without an icon, and a pass whose images have the wrong pixel size
looks blurred or cropped on the device.  A brand that has not uploaded artwork yet still
needs a card that installs, so this module draws a plain square in the brand colour with
the brand's initial.  Drawing is deterministic (same inputs, same bytes), which keeps the
manifest digests of re-issued passes stable, and cached, because a pass is rebuilt on every
balance change and Pillow work would otherwise dominate the build time.
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import lru_cache
from types import MappingProxyType
from typing import Final

from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]

#: Apple's three display scales; every image is shipped at each of them.
SCALES: Final = (1, 2, 3)
#: The icon is exactly 29×29 points (Wallet Developer Guide, "Pass Design and Creation").
ICON_POINTS: Final = (29, 29)
#: The logo may be at most 160×50 points; ours is a 50×50 point square.
LOGO_MAX_POINTS: Final = (160, 50)
DEFAULT_LOGO_POINTS: Final = (50, 50)
#: A store card's strip image may be at most 375×144 points.
STRIP_MAX_POINTS: Final = (375, 144)

_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"


def scaled_name(stem: str, scale: int) -> str:
    """Return Apple's file name for ``stem`` at ``scale`` (``icon.png``, ``icon@2x.png``…)."""
    return f"{stem}.png" if scale == 1 else f"{stem}@{scale}x.png"


def png_size(data: bytes) -> tuple[int, int]:
    """Return the pixel size of a PNG after checking its signature and header chunk.

    Only the header is read (no decompression), so validating every image of every build
    costs microseconds.  Raises ``ValueError`` with the reason when ``data`` is not a PNG.
    """
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG file (bad signature)")
    length, chunk_type = struct.unpack(">I4s", data[8:16])
    if chunk_type != b"IHDR" or length != 13:
        raise ValueError("not a PNG file (first chunk is not IHDR)")
    header = data[16:29]
    (crc,) = struct.unpack(">I", data[29:33])
    if zlib.crc32(b"IHDR" + header) != crc:
        raise ValueError("corrupt PNG header (IHDR checksum mismatch)")
    width, height = struct.unpack(">II", header[:8])
    if width == 0 or height == 0:
        raise ValueError("PNG has a zero dimension")
    return width, height


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled default font: no system font lookup, so the output is the same on
    # every machine that runs the same Pillow.
    return ImageFont.load_default(size=size)


def _draw_badge(width: int, height: int, letter: str, background: RGB, foreground: RGB) -> bytes:
    image = Image.new("RGB", (width, height), background)
    if letter:
        draw = ImageDraw.Draw(image)
        font = _font(max(8, int(min(width, height) * 0.62)))
        draw.text((width / 2, height / 2), letter, fill=foreground, font=font, anchor="mm")
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


@lru_cache(maxsize=64)
def default_pass_images(
    initial: str, background: RGB, foreground: RGB
) -> MappingProxyType[str, bytes]:
    """Return icon and logo PNGs (1x, 2x, 3x) in the brand colours, keyed by file name.

    ``initial`` is the first letter of the organisation name (upper-cased here).  The result
    is cached and read-only so that the same bytes can be shared by every build.
    """
    letter = initial.strip()[:1].upper()
    files: dict[str, bytes] = {}
    for scale in SCALES:
        icon_w, icon_h = ICON_POINTS
        files[scaled_name("icon", scale)] = _draw_badge(
            icon_w * scale, icon_h * scale, letter, background, foreground
        )
        logo_w, logo_h = DEFAULT_LOGO_POINTS
        files[scaled_name("logo", scale)] = _draw_badge(
            logo_w * scale, logo_h * scale, letter, background, foreground
        )
    return MappingProxyType(files)
