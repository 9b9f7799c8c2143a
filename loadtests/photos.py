"""Synthetic product photos: camera-size JPEGs (a lit backdrop, objects, sensor noise) for load, and small photos
whose shape and colour depend on their category (bags, phones, shoes) for models that must learn something."""
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from visual_search.images import IMAGE_SUFFIXES

CATEGORIES = ("bags", "phones", "shoes")


def product_photo(category, seed, size=(64, 48), mode="RGB"):
    """A photo-like image whose shape and colour depend on the category, with noise that depends on the seed."""
    rng = np.random.default_rng(seed)
    base = rng.integers(150, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    w, h = size
    colour = {"bags": (150, 40, 30), "phones": (20, 20, 20), "shoes": (30, 60, 160)}[category]
    jitter = int(rng.integers(-4, 5))
    if category == "bags":
        draw.rectangle([w // 4 + jitter, h // 3, 3 * w // 4, 5 * h // 6], fill=colour)
    elif category == "phones":
        draw.rectangle([2 * w // 5, h // 8 + jitter, 3 * w // 5, 7 * h // 8], fill=colour)
    else:
        draw.ellipse([w // 8, h // 2 + jitter, 7 * w // 8, 7 * h // 8], fill=colour)
    return image.convert(mode)


def encode(image, fmt="PNG", **options):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def product_jpeg(seed, size=(640, 480), quality=92):
    rng = np.random.default_rng(seed)
    w, h = size
    light = np.linspace(rng.uniform(170, 230), rng.uniform(200, 255), w)[None, :, None]
    shade = np.linspace(1.0, rng.uniform(0.75, 0.95), h)[:, None, None]
    backdrop = light * shade * rng.uniform(0.9, 1.0, size=(1, 1, 3))
    image = Image.fromarray(np.clip(backdrop, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        box = [int(x0), int(y0), int(x0 + rng.integers(w // 6, w // 2)), int(y0 + rng.integers(h // 6, h // 2))]
        colour = tuple(int(c) for c in rng.integers(0, 200, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rounded_rectangle)(box, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, size=(h, w, 3))
    return encode(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), "JPEG", quality=quality)


def load_photos(folder=None, count=32, size=(640, 480)):
    """Up to `count` image files from `folder` as bytes, or `count` synthetic product JPEGs."""
    if folder:
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
        if not files:
            raise FileNotFoundError(f"no images under {folder}")
        return [p.read_bytes() for p in files]
    return [product_jpeg(seed, size) for seed in range(count)]
