"""A corpus of hostile and awkward uploads, generated here (never downloaded).

Each item names what it is, its bytes, the HTTP status the API must answer and a phrase its
message must contain. Valid-but-awkward images (16-bit, CMYK, palette transparency, animated,
EXIF-rotated) must be answered 200 like any photo.
"""

import struct
import zlib
from typing import NamedTuple

from PIL import Image

from conftest import encode


class Upload(NamedTuple):
    name: str
    data: bytes
    status: int
    message: str


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width × height, followed by a few bytes of pixel data only."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def gif_header(width: int, height: int) -> bytes:
    """A GIF whose screen and single frame declare width × height, with one pixel of data."""
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
            + b"\x02\x02\x44\x01\x00\x3b")


def tiff_header(width: int, height: int) -> bytes:
    """A little-endian TIFF whose first IFD declares width × height, with one byte of data."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
               (273, 4, 8), (277, 3, 1), (278, 4, height), (279, 4, 1)]
    ifd = (struct.pack("<H", len(entries))
           + b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in entries)
           + struct.pack("<I", 0))
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def corpus(photo: Image.Image) -> list[Upload]:
    jpeg = encode(photo, "JPEG")
    png = bytearray(encode(photo, "PNG"))
    png[200:260] = b"\0" * 60  # damage the compressed pixel data
    palette = photo.convert("P")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return [
        Upload("zero-byte", b"", 400, "empty"),
        Upload("text-named-jpg", b"plain text, not a picture\n" * 8, 415, "Not a supported image"),
        Upload("truncated-jpeg", jpeg[: len(jpeg) // 3], 400, "truncated"),
        Upload("corrupt-png", bytes(png), 400, "Corrupt PNG"),
        Upload("ppm", encode(photo, "PPM"), 415, "Not a supported image"),
        Upload("png-100k-by-100k", png_header(100_000, 100_000), 400, "megapixel"),
        Upload("gif-65535-by-65535", gif_header(65_535, 65_535), 400, "megapixel"),
        Upload("tiff-100k-by-100k", tiff_header(100_000, 100_000), 400, "megapixel"),
        Upload("1x1", encode(photo.resize((1, 1)), "PNG"), 400, "at least 32 pixels"),
        Upload("21MB", b"\0" * (21 * 2**20), 413, "too large"),
        Upload("16-bit-png", encode(photo.convert("L").convert("I;16"), "PNG"), 200, ""),
        Upload("cmyk-jpeg", encode(photo.convert("CMYK"), "JPEG"), 200, ""),
        Upload("cmyk-tiff", encode(photo.convert("CMYK"), "TIFF"), 200, ""),
        Upload("palette-transparent-png", encode(palette, "PNG", transparency=0), 200, ""),
        Upload("animated-gif", encode(frames[0], "GIF", save_all=True,
                                      append_images=frames[1:]), 200, ""),
        Upload("exif-rotated-jpeg", encode(photo, "JPEG", exif=exif), 200, ""),
        Upload("webp", encode(photo, "WEBP"), 200, ""),
        Upload("bmp", encode(photo, "BMP"), 200, ""),
    ]
