"""Property: whatever bytes arrive, decoding + preprocessing either works or raises ImageError."""

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from leanvgg.images import ImageError, decode, preprocess


def _valid_images() -> list[bytes]:
    base = Image.new("RGB", (48, 40), (10, 200, 30))
    base.putpixel((3, 3), (255, 0, 0))
    out = []
    for fmt, mode in (("PNG", "RGBA"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"),
                      ("TIFF", "CMYK"), ("WEBP", "RGB"), ("PNG", "I;16")):
        buffer = io.BytesIO()
        image = base.convert("L").convert(mode) if mode == "I;16" else base.convert(mode)
        image.save(buffer, format=fmt)
        out.append(buffer.getvalue())
    return out


VALID = _valid_images()


def _decode_and_preprocess(data: bytes) -> None:
    try:
        image = decode(data).square
    except ImageError:
        return
    batch = preprocess(image, 64)
    assert batch.shape == (1, 3, 64, 64) and torch.isfinite(batch).all()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_only_raise_image_error(data):
    _decode_and_preprocess(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                         min_size=1, max_size=8),
       st.integers(0, 10**6))
def test_mutated_images_only_raise_image_error(original, flips, cut):
    data = bytearray(original)
    for position, value in flips:
        data[position % len(data)] = value
    _decode_and_preprocess(bytes(data[: max(1, cut % (len(data) + 1))]))


@pytest.mark.parametrize("index", range(len(VALID)))
def test_the_seeds_themselves_decode(index):
    picture = decode(VALID[index])
    assert (picture.width, picture.height) == (48, 40)
