"""Decoding uploads: every common format and mode to RGB, and a clear reason for what is not an image."""
import io

import pytest
from PIL import Image

from tests.fixtures import encode, product_photo
from visual_search.errors import InputError
from visual_search.images import decode_image

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


def associated_alpha_tiff(image):
    """A TIFF of an LA image marked as associated (premultiplied) alpha, which PIL opens in mode La."""
    data = encode(image, "TIFF")
    unassociated = b"\x52\x01\x03\x00\x01\x00\x00\x00\x02\x00"  # ExtraSamples (338), SHORT, 1 value: 2
    assert data.count(unassociated) == 1
    return data.replace(unassociated, unassociated[:8] + b"\x01\x00")


def test_sixteen_bit_big_endian_and_associated_alpha_tiffs_decode():
    big_endian = Image.frombytes("I;16B", (8, 8), bytes(range(128)))
    assert Image.open(io.BytesIO(encode(big_endian, "TIFF"))).mode == "I;16B"
    assert decode_image(encode(big_endian, "TIFF")).getpixel((7, 7)) == (126, 126, 126)  # 0x7E7F / 256
    premultiplied = associated_alpha_tiff(Image.new("LA", (8, 8), (100, 255)))
    assert Image.open(io.BytesIO(premultiplied)).mode == "La"
    assert decode_image(premultiplied).getpixel((0, 0)) == (100, 100, 100)
