"""Altered copies of a listing's photo, as a re-post or a copied listing would upload them: JPEG recompression,
resizing, crops, small rotations, brightness and contrast shifts, a text watermark, a mirror image, and a re-post
that resizes, crops and recompresses. Each returns the upload's bytes and the parameter it drew."""
import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from visual_search.images import to_rgb

WATERMARKS = ("SALE", "@shop", "NEW", "sold", "©me")


def encode(image, fmt="PNG", **options):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def either_side(rng, low, high):
    """A factor in [low, high] or in [1 / high, 1 / low], each side as likely: a visible change, never none."""
    factor = float(rng.uniform(low, high))
    return factor if rng.random() < 0.5 else 1.0 / factor


def background(image):
    """The colour of the image's corners, to fill what a rotation uncovers."""
    pixels = np.asarray(image)
    corners = np.stack([pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]])
    value = np.median(corners, axis=0).astype(int)
    return int(value) if value.ndim == 0 else tuple(value.tolist())


def jpeg(image, rng):
    quality = int(rng.integers(30, 91))
    return encode(image, "JPEG", quality=quality), f"quality {quality}"


def resize(image, rng):
    scale = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return encode(image.resize(size, Image.Resampling.BICUBIC)), f"x{scale:.2f}"


def crop(image, rng):
    keep = float(rng.uniform(0.80, 0.95))
    w, h = max(1, round(image.width * keep)), max(1, round(image.height * keep))
    x, y = int(rng.integers(0, image.width - w + 1)), int(rng.integers(0, image.height - h + 1))
    return encode(image.crop((x, y, x + w, y + h))), f"keeps {keep:.0%}"


def rotate(image, rng):
    angle = float(rng.uniform(3, 10)) * (1 if rng.random() < 0.5 else -1)
    return encode(image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=background(image))), \
        f"{angle:+.1f} degrees"


def brightness(image, rng):
    factor = either_side(rng, 1.15, 1.45)
    return encode(ImageEnhance.Brightness(image).enhance(factor)), f"x{factor:.2f}"


def contrast(image, rng):
    factor = either_side(rng, 1.2, 1.6)
    return encode(ImageEnhance.Contrast(image).enhance(factor)), f"x{factor:.2f}"


def watermark(image, rng):
    """A semi-transparent text across the photo, a fifth of its height, somewhere inside it."""
    text = WATERMARKS[int(rng.integers(len(WATERMARKS)))]
    base = to_rgb(image).convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    font = ImageFont.load_default(size=max(6, base.height // 5))
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = int(rng.integers(0, max(1, base.width - (right - left)) + 1))
    y = int(rng.integers(0, max(1, base.height - (bottom - top)) + 1))
    shade = int(rng.choice([40, 215]))
    draw.text((x - left, y - top), text, font=font, fill=(shade, shade, shade, int(rng.integers(110, 180))))
    marked = Image.alpha_composite(base, layer).convert("RGB")
    return encode(marked.convert("L") if image.mode == "L" else marked), f"'{text}'"


def flip(image, rng):
    return encode(ImageOps.mirror(image)), "mirrored"


def repost(image, rng):
    """Resized, cropped and recompressed, as a photo saved from one listing and uploaded to another."""
    scale = float(np.exp(rng.uniform(np.log(0.6), np.log(1.8))))
    keep = float(rng.uniform(0.85, 0.95))
    quality = int(rng.integers(50, 86))
    w, h = max(1, round(image.width * keep)), max(1, round(image.height * keep))
    x, y = int(rng.integers(0, image.width - w + 1)), int(rng.integers(0, image.height - h + 1))
    cropped = image.crop((x, y, x + w, y + h))
    resized = cropped.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    return encode(resized, "JPEG", quality=quality), f"x{scale:.2f}, keeps {keep:.0%}, quality {quality}"


ALTERATIONS = {"jpeg": jpeg, "resize": resize, "crop": crop, "rotate": rotate, "brightness": brightness,
               "contrast": contrast, "watermark": watermark, "flip": flip, "repost": repost}


def altered_copies(image, rng, names=tuple(ALTERATIONS)):
    """[(alteration, upload bytes, parameter)] of one photo (a PIL image), one copy per alteration."""
    if image.mode not in ("L", "RGB"):
        image = to_rgb(image)
    return [(name, *ALTERATIONS[name](image, rng)) for name in names]
