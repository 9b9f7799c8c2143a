"""Decode untrusted image bytes or files to RGB, with a clear reason when they are not a usable image.

Given the model's input side `size`, a large image is shrunk while it is decoded (JPEG's DCT scaling, `draft`) and
right after (an integer box reduction), never below `size` on either side: a batch then holds small images, not
full-resolution ones, and the transform's resize does the rest. Training and serving decode the same way.
"""
import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
MAX_PIXELS = 40_000_000  # about 6300x6300; larger uploads are refused, not decoded
PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}  # TIFF's associated alpha


def to_rgb(image):
    """Any PIL mode (L, P, LA, La, RGBA, I;16 in either byte order, I, F, CMYK...) to RGB; transparency is laid on
    white, and 16- and 32-bit values are scaled down by 256."""
    if image.mode == "RGB":
        return image
    if image.mode in PREMULTIPLIED:
        image = image.convert(PREMULTIPLIED[image.mode])
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64) / 256
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def shrink(image, size):
    """Box-reduces an RGB image by the largest whole factor that keeps both sides at `size` or more."""
    factor = min(image.width // size, image.height // size)
    return image.reduce(factor) if factor >= 2 else image


def decode_image(data, size=None):
    """Bytes of any common format (JPEG, PNG, WebP, GIF, BMP, TIFF) to an RGB PIL image.

    `size`: the model's input side; larger images come back reduced, each side still `size` or more.
    """
    if data is None or len(data) == 0:
        raise InputError("empty body: send the image bytes", label="empty")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise InputError(f"image is {width}x{height}, over the {MAX_PIXELS} pixel limit", status=413,
                             label="too_large")
        if size and image.format == "JPEG":
            image.draft(None, (size, size))  # decode at 1/2, 1/4 or 1/8 scale when that stays >= size
        image.load()  # reads the whole file: truncation shows up here
        image = to_rgb(image)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError("not an image: the body is in no format we can decode", label="not_image") from None
    except Image.DecompressionBombError as error:
        raise InputError(f"image too large: {error}", status=413, label="too_large") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"corrupt or truncated image: {error}", label="truncated") from None
    return shrink(image, size) if size else image


def open_image(path, size=None):
    """An image file on disk to RGB, through the same decoder the service uses."""
    return decode_image(Path(path).read_bytes(), size)
