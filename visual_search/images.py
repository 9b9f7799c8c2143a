"""Decode untrusted image bytes or files to RGB, with a clear reason when they are not a usable image."""
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
MAX_PIXELS = 40_000_000  # about 6300x6300; larger uploads are refused, not decoded


class InputError(ValueError):
    """A request we cannot answer; `reason` goes back to the client with HTTP `status`.

    `label` is a short stable name for the kind of rejection (the metrics' Reason dimension).
    """

    def __init__(self, reason, status=400, label="bad_request"):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.label = label


def to_rgb(image):
    """Any PIL mode (L, P, LA, RGBA, I;16, CMYK...) to RGB; transparency is laid on white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def decode_image(data):
    """Bytes of any common format (JPEG, PNG, WebP, GIF, BMP, TIFF) to an RGB PIL image."""
    if data is None or len(data) == 0:
        raise InputError("empty body: send the image bytes", label="empty")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise InputError(f"image is {width}x{height}, over the {MAX_PIXELS} pixel limit", status=413,
                             label="too_large")
        image.load()  # reads the whole file: truncation shows up here
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError("not an image: the body is in no format we can decode", label="not_image") from None
    except Image.DecompressionBombError as error:
        raise InputError(f"image too large: {error}", status=413, label="too_large") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"corrupt or truncated image: {error}", label="truncated") from None
    return to_rgb(image)


def open_image(path):
    """An image file on disk to RGB, through the same decoder the service uses."""
    return decode_image(Path(path).read_bytes())
