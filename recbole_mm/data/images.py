"""Reading item images: one loader for feature extraction and SICSRec stage 1.

* :func:`open_image` -- ``(RGB image, None)`` or ``(None, reason)``, never raises; ``reason``
  starts with one of :data:`PROBLEMS`: ``missing_file`` (no path / no file), ``unsupported_format``
  (a file Pillow cannot read by design: SVG, HEIC, PDF, an unknown extension ...; convert it to
  PNG/JPEG) or ``corrupt`` (a format Pillow reads, but this file fails to decode);
* :func:`to_rgb` -- images with an alpha channel (RGBA, LA, PA, P or L/RGB with a transparency
  entry) are composited onto a background colour (default white, spec key ``image_background``)
  instead of having their alpha dropped (which shows transparent pixels as black); every other
  mode is converted to RGB as is;
* :func:`parse_background` -- checks an ``image_background`` value (``[R, G, B]``, 0..255).
"""

from __future__ import annotations

import functools
import os

DEFAULT_BACKGROUND = (255, 255, 255)
PROBLEMS = ("missing_file", "corrupt", "unsupported_format")

# image formats Pillow has no decoder for (unless a plugin registers one, e.g. pillow-heif):
# files with these extensions are item images in an unsupported format, not "missing"
UNSUPPORTED_IMAGE_EXTENSIONS = (".svg", ".svgz", ".heic", ".heif", ".jxl", ".pdf", ".ai")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_CONVERT_HINT = "convert it to PNG or JPEG (e.g. cairosvg / rsvg-convert for SVG)"


def parse_background(value, where="image_background") -> tuple:
    """``(R, G, B)`` ints from ``value`` (None: white); ValueError naming ``where`` otherwise."""
    if value is None:
        return DEFAULT_BACKGROUND
    ok = (isinstance(value, (list, tuple)) and len(value) == 3
          and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value))
    if not ok:
        raise ValueError(f"{where} must be an [R, G, B] list of three integers in 0..255 (the colour transparent "
                         f"image pixels are composited onto; default {list(DEFAULT_BACKGROUND)} = white), "
                         f"got {value!r}")
    return tuple(int(c) for c in value)


def has_alpha(im) -> bool:
    """True when ``im`` (a PIL image) carries transparency: an alpha band, a palette with alpha or
    a transparency entry (``P``/``L``/``RGB`` images with a tRNS / GIF transparency index)."""
    if im.mode in _ALPHA_MODES:
        return True
    if im.mode in ("P", "L", "RGB", "1") and "transparency" in im.info:
        return True
    return im.mode == "P" and getattr(im.palette, "mode", None) == "RGBA"


def to_rgb(im, background=DEFAULT_BACKGROUND):
    """``im`` as an RGB image; transparent pixels composited onto ``background`` (opaque pixels
    unchanged, partly transparent ones blended)."""
    from PIL import Image

    if not has_alpha(im):
        return im if im.mode == "RGB" else im.convert("RGB")
    rgba = im.convert("RGBA")
    base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


@functools.lru_cache(maxsize=None)
def _extension_sets():
    """(readable, unsupported): extensions Pillow decodes (as registered now, plugins included),
    and the known image extensions it has no decoder for (save-only formats such as PDF too)."""
    from PIL import Image

    Image.init()
    registered = {ext.lower(): fmt for ext, fmt in Image.registered_extensions().items()}
    # MPO files are opened by the JPEG decoder: registered for saving only, readable all the same
    readable = {ext for ext, fmt in registered.items() if fmt in Image.OPEN or fmt == "MPO"}
    unsupported = (set(registered) - readable) | (set(UNSUPPORTED_IMAGE_EXTENSIONS) - readable)
    return frozenset(readable), frozenset(unsupported)


def readable_extensions() -> frozenset:
    return _extension_sets()[0]


def unsupported_extensions() -> frozenset:
    return _extension_sets()[1]


def image_extensions() -> frozenset:
    """Every extension an item image may have: readable and known-unsupported (reported as such)."""
    readable, unsupported = _extension_sets()
    return readable | unsupported


def _sniff(path):
    """The format of a file Pillow cannot identify, from its first bytes: 'SVG', 'PDF', 'HEIC' or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head.startswith(b"%PDF"):
        return "PDF"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
        return "HEIC"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<") and b"<svg" in text:
        return "SVG"
    return None


def _unsupported(path, exc):
    """The ``unsupported_format`` reason for a file Pillow could not identify, or None (corrupt)."""
    from PIL import UnidentifiedImageError

    if not isinstance(exc, UnidentifiedImageError):
        return None
    ext = os.path.splitext(path)[1].lower()
    fmt = _sniff(path)
    if fmt is None and ext in readable_extensions():
        return None  # a .jpg / .png Pillow cannot identify is a broken file
    what = fmt or (ext.lstrip(".").upper() if ext else "a file without extension")
    return f"unsupported_format: {what} (Pillow cannot read it); {_CONVERT_HINT}"


def open_image(path, background=DEFAULT_BACKGROUND):
    """``(RGB image, None)`` or ``(None, reason)`` -- never raises; see the module docstring."""
    from PIL import Image

    if path is None or not os.path.isfile(path):
        return None, "missing_file"
    try:
        with Image.open(path) as im:
            im.load()  # force decoding: truncated files fail here
            return to_rgb(im, background), None
    except Exception as e:  # corrupt, truncated, unsupported, decompression bomb ...
        return None, _unsupported(path, e) or f"corrupt: {type(e).__name__}: {e}"


def problem_kind(reason) -> str:
    """The :data:`PROBLEMS` entry a reason from :func:`open_image` starts with."""
    kind = str(reason).split(":", 1)[0]
    return kind if kind in PROBLEMS else "corrupt"


__all__ = ["DEFAULT_BACKGROUND", "PROBLEMS", "UNSUPPORTED_IMAGE_EXTENSIONS", "parse_background", "has_alpha",
           "to_rgb", "open_image", "problem_kind", "readable_extensions", "unsupported_extensions",
           "image_extensions"]
