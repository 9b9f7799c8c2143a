"""Decoding uploads: every common format and mode to RGB, and a clear reason for what is not an image."""
import pytest
from PIL import Image

from tests.fixtures import encode, product_photo
from visual_search.images import InputError, decode_image

PHOTO = product_photo("bags", 1, size=(64, 48))


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGBA"), ("PNG", "P"),
                                      ("PNG", "I;16"), ("WEBP", "RGB"), ("GIF", "P"), ("BMP", "RGB"),
                                      ("TIFF", "CMYK"), ("PNG", "LA")])
def test_common_formats_and_modes_decode_to_rgb(fmt, mode):
    image = decode_image(encode(PHOTO.convert(mode), fmt))
    assert image.mode == "RGB" and image.size == (64, 48)


def test_transparent_areas_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert decode_image(encode(image, "PNG")).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("body,status,reason", [
    (b"", 400, "empty"),
    (b"just some text", 400, "not an image"),
    (encode(PHOTO, "JPEG")[:200], 400, "truncated"),
])
def test_bad_bodies_raise_input_error_with_reason(body, status, reason):
    with pytest.raises(InputError, match=reason) as info:
        decode_image(body)
    assert info.value.status == status


def test_absurdly_large_images_are_refused_before_decoding():
    huge = encode(Image.new("L", (8000, 6000)), "PNG")
    with pytest.raises(InputError, match="pixel limit") as info:
        decode_image(huge)
    assert info.value.status == 413
