"""Decoding, validation and preprocessing of input images: the only module that touches Pillow."""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image, ImageOps

from leanvgg.models import IMAGENET_WEIGHTS

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_WHITE = (255, 255, 255, 255)


class ImageError(ValueError):
    """The input is not an image leanvgg can use; the message says why, in one line."""


class UnsupportedFormat(ImageError):
    """The bytes are not an image in one of ``ALLOWED_FORMATS`` (judged by content)."""


class ImageTooLarge(ImageError):
    """The file is larger than ``ImageLimits.max_bytes``."""


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what is accepted, so hostile or absurd inputs fail before they cost memory."""

    max_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000
    min_side: int = 32

    def __post_init__(self) -> None:
        # Pillow's decompression-bomb guard stays in force: our bound may only be stricter.
        if Image.MAX_IMAGE_PIXELS is not None and self.max_pixels > Image.MAX_IMAGE_PIXELS:
            raise ValueError(
                f"max_pixels {self.max_pixels} exceeds Pillow's decompression-bomb limit "
                f"{Image.MAX_IMAGE_PIXELS}; it may only be lowered."
            )


DEFAULT_LIMITS = ImageLimits()


def read_file(path: str | Path, *, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """The bytes of an image file, refusing missing, unreadable or oversized files."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ImageError(f"{str(path)!r} is not a file.")
        if size > limits.max_bytes:
            raise ImageTooLarge(_too_large(size, limits))
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{str(path)!r}: no such file.") from None
    except PermissionError:
        raise ImageError(f"{str(path)!r}: permission denied.") from None


def decode(data: bytes, *, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Validate image bytes and return an upright RGB image (first frame of an animation)."""
    if not data:
        raise ImageError("The file is empty.")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(_too_large(len(data), limits))
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise ImageError(
            f"Image is larger than the {limits.max_pixels / 1e6:g}-megapixel limit "
            "(refused as a possible decompression bomb)."
        ) from None
    except Exception:  # Pillow signals "not an image" with several exception types
        claimed = _claimed_format(data)
        if claimed:  # the signature of an allowed format, but its headers are damaged
            raise ImageError(f"Corrupt {claimed} image (its headers do not parse).") from None
        raise UnsupportedFormat(
            f"Not a supported image (allowed: {', '.join(ALLOWED_FORMATS)})."
        ) from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageError(
            f"Image is {width}×{height} = {width * height / 1e6:.1f} megapixels; "
            f"the limit is {limits.max_pixels / 1e6:g} megapixels."
        )
    if min(width, height) < limits.min_side:
        raise ImageError(
            f"Image is {width}×{height}; both sides must be at least {limits.min_side} pixels."
        )
    try:
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))
    except Exception as err:  # truncated or corrupt data surfaces here, with many types
        raise ImageError(f"Corrupt or truncated {image.format} image ({err}).") from None


def _claimed_format(data: bytes) -> str | None:
    Image.init()
    for fmt in ALLOWED_FORMATS:
        accept = Image.OPEN[fmt][1]
        if accept is not None and accept(data[:16]):
            return fmt
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    elif image.mode in ("I", "F"):
        low, high = image.getextrema()
        scale = 255 / (high - low) if high > low else 0
        image = image.point(lambda v: (v - low) * scale).convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image.convert("RGB")


@lru_cache(maxsize=None)
def _transform(size: int):
    # The weights' own preset (bilinear, antialiased, ImageNet mean/std) at any input size.
    return IMAGENET_WEIGHTS.transforms(crop_size=size, resize_size=round(size * 256 / 224))


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """A 1×3×size×size batch: shorter side to round(size·256/224), centre crop, normalise."""
    return _transform(size)(image).unsqueeze(0)


def _too_large(size: int, limits: ImageLimits) -> str:
    return f"File is {size / 2**20:.1f} MB; the limit is {limits.max_bytes / 2**20:g} MB."
