"""A corpus of hostile and unusual inputs, with the outcome each must have everywhere
(training data loading, `encode`, `eval`): converted to RGB, or skipped with a reason."""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np
from PIL import Image


@dataclass
class Corpus:
    root: Path
    converted: Dict[str, tuple] = field(default_factory=dict)  # relative path -> (width, height) after EXIF
    skipped_at_scan: Dict[str, str] = field(default_factory=dict)  # found by the header check: reason fragment
    skipped_at_decode: Dict[str, Optional[str]] = field(default_factory=dict)  # header fine, pixels broken

    @property
    def skipped(self) -> Dict[str, str]:
        return {**self.skipped_at_scan, **self.skipped_at_decode}


def _photo(size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, size[0], dtype=np.float32)
    y = np.linspace(0, 255, size[1], dtype=np.float32)[:, None]
    array = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1) + rng.normal(0, 8, (size[1], size[0], 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that *declares* width x height (and holds no pixel data): a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def build_corpus(root: Path) -> Corpus:
    root.mkdir(parents=True, exist_ok=True)
    corpus = Corpus(root)
    photo = _photo()

    def converted(name: str, image: Image.Image, size=None, **kwargs):
        fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "tif": "TIFF"}[name.rsplit(".", 1)[1]]
        (root / name).write_bytes(_encoded(image, fmt, **kwargs))
        corpus.converted[name] = size or image.size

    converted("plain.jpg", photo)
    converted("cmyk.jpg", photo.convert("CMYK"))
    converted("grey.jpg", photo.convert("L"))
    converted("deep16.png", Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257)))
    converted("palette.png", photo.convert("P", palette=Image.ADAPTIVE, colors=16))
    palette = photo.convert("P", palette=Image.ADAPTIVE, colors=16)
    converted("palette_transparent.png", palette, transparency=0)
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    converted("rgba.png", rgba)
    converted("la.png", photo.convert("LA"))
    converted("one_pixel.png", Image.new("RGB", (1, 1), (200, 10, 10)))
    converted("small_10x12.png", photo.resize((10, 12)))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    converted("exif_rotated.jpg", photo, size=(photo.height, photo.width), exif=exif.tobytes())
    converted("image.webp", photo)
    converted("image.bmp", photo)
    converted("image.tif", photo)
    (root / "nested").mkdir()
    (root / "nested" / "deeper.png").write_bytes(_encoded(photo, "PNG"))
    corpus.converted["nested/deeper.png"] = photo.size

    (root / "zero_bytes.png").write_bytes(b"")
    corpus.skipped_at_scan["zero_bytes.png"] = "not a recognised image"
    (root / "not_an_image.jpg").write_text("this is a text file with an image extension\n")
    corpus.skipped_at_scan["not_an_image.jpg"] = "not a recognised image"
    (root / "bomb.png").write_bytes(png_header_only(30_000, 30_000))  # 900 M pixels: over 2x PIL's limit
    corpus.skipped_at_scan["bomb.png"] = "decompression bomb"
    (root / "bomb_warning.png").write_bytes(png_header_only(10_000, 10_000))  # 100 M: over the limit itself
    corpus.skipped_at_scan["bomb_warning.png"] = "decompression bomb"
    os.symlink(root / "does-not-exist.png", root / "dangling_link.png")
    corpus.skipped_at_scan["dangling_link.png"] = "No such file"
    if os.geteuid() != 0:  # root reads everything: permissions cannot be tested as root
        (root / "no_permission.png").write_bytes(_encoded(photo, "PNG"))
        os.chmod(root / "no_permission.png", 0)
        corpus.skipped_at_scan["no_permission.png"] = "Permission"

    png, jpg = _encoded(photo, "PNG"), _encoded(photo, "JPEG")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    corpus.skipped_at_decode["truncated.png"] = None  # the message depends on where the data stops
    (root / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    corpus.skipped_at_decode["truncated.jpg"] = "truncated"

    (root / "readme.txt").write_text("not an image extension: not an input at all")
    os.symlink(root, root / "nested" / "loop")  # a symlink loop in the folder tree
    return corpus
