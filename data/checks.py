"""File checks: a cheap one for the loader's pre-scan and a full decode for verify_dataset.py.

The cheap check reads a file's first bytes, its last few KB and its header (via PIL, no pixel decode):
zero-byte files, non-images, formats other than JPEG/PNG and truncated JPEG/PNG files are caught in
well under a millisecond per file. A JPEG whose entropy-coded data is damaged but complete in length is
only caught by a full decode (`decode_check`), which is verify_dataset.py's job.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_EOI = b"\xff\xd9"
PNG_IEND = b"IEND"
# End markers are looked for in this many trailing bytes: tolerates a little padding after the marker.
TAIL_BYTES = 4096
FORMATS = ("JPEG", "PNG")
# Everything PIL may raise on a damaged or hostile file; anything else is a bug and should surface.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, UnidentifiedImageError, Image.DecompressionBombError,
                 IndexError, TypeError, KeyError)


class FileInfo(NamedTuple):
    """Image size from the header, or reason != '' when the file is unusable."""

    width: int
    height: int
    reason: str


def cheap_check(path: str | os.PathLike[str]) -> FileInfo:
    """Catch zero-byte, non-image, unsupported and truncated files without decoding pixels."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(PNG_MAGIC))
            if not head:
                return FileInfo(0, 0, "empty file (0 bytes)")
            if head.startswith(JPEG_MAGIC):
                kind, marker = "JPEG", JPEG_EOI
            elif head.startswith(PNG_MAGIC):
                kind, marker = "PNG", PNG_IEND
            else:
                return FileInfo(0, 0, f"not a JPEG or PNG image (starts with {head[:4].hex(' ')})")
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            if marker not in f.read():
                what = "end-of-image marker" if kind == "JPEG" else "IEND chunk"
                return FileInfo(0, 0, f"truncated {kind} (no {what} at the end of {size} bytes)")
            f.seek(0)
            with Image.open(f, formats=FORMATS) as im:
                width, height = im.size
    except DECODE_ERRORS as e:
        return FileInfo(0, 0, f"unreadable header: {_one_line(e)}")
    if width <= 0 or height <= 0:
        return FileInfo(0, 0, f"invalid image size {width}x{height}")
    return FileInfo(width, height, "")


def decode_check(path: str | os.PathLike[str]) -> str:
    """'' if the file passes the cheap check and decodes fully to RGB, else why not."""
    info = cheap_check(path)
    if info.reason:
        return info.reason
    try:
        with Image.open(path, formats=FORMATS) as im:
            im.convert("RGB")
    except DECODE_ERRORS as e:
        return f"decode failed: {_one_line(e)}"
    return ""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
