"""Product-photo-like JPEGs at camera sizes (640x480 by default): a lit backdrop, an object, sensor noise."""
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from visual_search.images import IMAGE_SUFFIXES


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
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def load_photos(folder=None, count=32, size=(640, 480)):
    """Up to `count` image files from `folder` as bytes, or `count` synthetic product JPEGs."""
    if folder:
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
        if not files:
            raise FileNotFoundError(f"no images under {folder}")
        return [p.read_bytes() for p in files]
    return [product_jpeg(seed, size) for seed in range(count)]
