"""Images travel as PNG bytes in a binary Parquet column: lossless, compact, readable by any tool."""

from __future__ import annotations

import io

from PIL import Image


def to_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def from_png(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")
