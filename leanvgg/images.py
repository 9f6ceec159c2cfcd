"""Decoding, validation and preprocessing of input images: the only module that touches Pillow.

Memory per image is bounded: every variant sees only the centre of the picture (shorter side
resized, centre crop), so decoding keeps only the centre square, shrunk early (JPEG DCT scaling,
then integer box reduction in strips) and converted to RGB a strip at a time. Whatever the
aspect ratio, what is left is at most ``WORK_SIDE``·2 pixels square; the one full-size buffer is
the decoder's own output (at most ``max_pixels`` × 4 bytes for RGBA).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from PIL import ExifTags, Image

from leanvgg.models import IMAGENET_WEIGHTS

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_WHITE = (255, 255, 255, 255)
# The centre square is reduced by an integer factor to a side in [WORK_SIDE, 2·WORK_SIDE): twice
# the largest resize target (256 px for 224 inputs), so the final antialiased resize still
# sees every detail it would have seen in the full image.
WORK_SIDE = 512
_STRIP_ROWS = 32  # output rows converted per strip: a strip costs side × 32·factor pixels
# EXIF orientation → the transposition that makes the picture upright (as ImageOps does).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


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


@dataclass(frozen=True)
class Batches:
    """An upload ready for the models: one normalised 1×3×s×s tensor per input size s."""

    width: int  # the upload's size, upright
    height: int
    tensors: dict[int, torch.Tensor]


@dataclass(frozen=True)
class Picture:
    """A decoded upload: the upright centre square the models look at, and the full size."""

    square: Image.Image  # RGB, side < 2·WORK_SIDE (or the shorter side, if smaller)
    width: int
    height: int

    @classmethod
    def of(cls, image: Image.Image) -> Picture:
        """An image already in memory (e.g. from the Python API), taken as it is displayed."""
        return cls(_centre_square_rgb(image), image.width, image.height)

    def batches(self, sizes: set[int] | list[int]) -> Batches:
        return Batches(self.width, self.height,
                       {size: preprocess(self.square, size) for size in sorted(set(sizes))})


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
    except OSError as err:  # a symlink loop, a name too long, an I/O error
        raise ImageError(f"{str(path)!r}: cannot be read ({err.strerror or err}).") from None


def check(data: bytes, *, limits: ImageLimits = DEFAULT_LIMITS) -> Checked:
    """Validate the bytes and the image's headers (format, size, pixel count): no pixel is
    decoded yet, so this is cheap enough to run before a request is admitted."""
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
        image.close()
        raise ImageError(
            f"Image is {width}×{height} = {width * height / 1e6:.1f} megapixels; "
            f"the limit is {limits.max_pixels / 1e6:g} megapixels."
        )
    if min(width, height) < limits.min_side:
        image.close()
        raise ImageError(
            f"Image is {width}×{height}; both sides must be at least {limits.min_side} pixels."
        )
    return Checked(image)


@dataclass(frozen=True)
class Checked:
    """An image whose headers passed ``check``; ``decode`` reads its pixels (once)."""

    image: Image.Image

    def decode(self) -> Picture:
        """The upright RGB centre square (first frame if animated); bounded memory."""
        image = self.image
        width, height = image.size
        try:
            side = min(width, height)
            if side > 2 * WORK_SIDE:  # JPEG: decode at 1/2, 1/4 or 1/8 scale at once
                scale = WORK_SIDE / side
                image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
            image.load()
            orientation = image.getexif().get(ExifTags.Base.Orientation)
            square = _centre_square_rgb(image)
        except Exception as err:  # truncated or corrupt data surfaces here, with many types
            raise ImageError(f"Corrupt or truncated {image.format} image ({err}).") from None
        finally:
            # Free the full-size pixels now, not when the last reference to this Checked goes
            # (``with image:`` only closes the file): the request that holds it may not have
            # let go before the next upload's decode starts, and two full-size buffers at once
            # broke the decode memory bound (the four worst uploads decoded with every
            # request's reference held: 488 MB at the peak, 235 MB once each is closed).
            image.close()
        if orientation in _UPRIGHT:
            square = square.transpose(_UPRIGHT[orientation])
            if orientation >= 5:  # a quarter turn: the upright picture is height × width
                width, height = height, width
        return Picture(square, width, height)


def decode(data: bytes, *, limits: ImageLimits = DEFAULT_LIMITS) -> Picture:
    """``check`` then ``decode``: the upright RGB centre square of valid image bytes."""
    return check(data, limits=limits).decode()


def _centre_square_rgb(image: Image.Image) -> Image.Image:
    """The centre square of a loaded image, reduced below 2·WORK_SIDE, as RGB.

    Converted and reduced a strip at a time, so no full-size copy is ever made (an RGBA image's
    premultiplication, a 16-bit image's rescaling and every mode conversion act on one strip).
    """
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    factor = max(1, side // WORK_SIDE)
    out_side = math.ceil(side / factor)
    extrema = image.getextrema() if image.mode in ("I", "F") else None
    square = Image.new("RGB", (out_side, out_side))
    step = _STRIP_ROWS * factor
    for row in range(0, side, step):
        strip = image.crop((left, top + row, left + side, top + min(row + step, side)))
        strip = _to_rgb(strip, extrema)
        if factor > 1:
            strip = strip.reduce(factor)
        square.paste(strip, (0, row // factor))
    return square


def _claimed_format(data: bytes) -> str | None:
    Image.init()
    for fmt in ALLOWED_FORMATS:
        accept = Image.OPEN[fmt][1]
        if accept is not None and accept(data[:16]):
            return fmt
    return None


def _to_rgb(image: Image.Image, extrema: tuple | None = None) -> Image.Image:
    """RGB, transparency composited on white; ``extrema``: the whole image's, for I/F modes."""
    if image.mode in _SIXTEEN_BIT_MODES:
        image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    elif image.mode in ("I", "F"):
        low, high = extrema or image.getextrema()
        scale = 255 / (high - low) if high > low else 0
        image = image.point(lambda v: (v - low) * scale).convert("L")
    has_alpha = image.mode in _ALPHA_MODES or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image.convert("RGB")


@lru_cache(maxsize=None)
def transform(size: int):
    # The weights' own preset (bilinear, antialiased, ImageNet mean/std) at any input size.
    return IMAGENET_WEIGHTS.transforms(crop_size=size, resize_size=round(size * 256 / 224))


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """A 1×3×size×size batch: shorter side to round(size·256/224), centre crop, normalise.

    Contiguous: the preset's tensor is a channels-last view of the pixels, and compiled
    (AOTInductor) models read their input as contiguous memory whatever its strides.
    """
    return transform(size)(image).unsqueeze(0).contiguous()


def _too_large(size: int, limits: ImageLimits) -> str:
    return f"File is {size / 2**20:.1f} MB; the limit is {limits.max_bytes / 2**20:g} MB."
