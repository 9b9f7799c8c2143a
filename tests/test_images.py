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


def test_large_images_are_shrunk_while_decoding_never_below_the_input_size():
    photo = product_photo("shoes", 2, size=(4000, 3000))
    jpeg = decode_image(encode(photo, "JPEG"), size=225)
    assert jpeg.mode == "RGB" and jpeg.size == (500, 375)  # JPEG decoded at 1/8 scale: still over 225 each side
    png = decode_image(encode(photo.resize((2000, 1500)), "PNG"), size=225)
    assert png.mode == "RGB" and png.size == (334, 250)  # box-reduced by 6 (ceil), the largest factor keeping 225
    narrow = decode_image(encode(photo.resize((3000, 300)), "PNG"), size=225)
    assert narrow.size == (3000, 300)  # no whole factor keeps the short side at 225
    assert decode_image(encode(PHOTO, "PNG"), size=32).size == (64, 48)  # under twice the size: as it is


def test_shrinking_keeps_the_model_input_close_to_a_full_decode():
    from visual_search.preprocessing import PreprocessSettings, eval_transform

    transform = eval_transform(PreprocessSettings(image_size=225))
    for fmt in ("JPEG", "PNG"):
        data = encode(product_photo("bags", 4, size=(2400, 1800)), fmt)
        shrunk, full = transform(decode_image(data, size=225)), transform(decode_image(data))
        assert shrunk.shape == full.shape == (3, 225, 225)
        assert (shrunk - full).abs().mean() < 0.02, fmt  # normalised units; a pixel level is about 0.017
