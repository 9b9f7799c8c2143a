"""Small real inputs for the tests: synthetic product photos, a trained tiny model, its bundle and archive."""
import io
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from serving.torchserve import ADDRESS_KEYS, TorchServe, free_port

CATEGORIES = ("bags", "phones", "shoes")
IMAGE_SIZE = 32  # the tests' model input; the service default is 225


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


def write_photo_folder(root, per_category=8):
    """root/<category>/<category>-NN.{png,jpg}: a user's folder of photos, mixed formats and modes."""
    root = Path(root)
    for c, category in enumerate(CATEGORIES):
        (root / category).mkdir(parents=True, exist_ok=True)
        for i in range(per_category):
            mode = "L" if i % 4 == 3 else "RGB"
            image = product_photo(category, seed=100 * c + i, mode=mode)
            suffix, fmt = (".jpg", "JPEG") if i % 2 else (".png", "PNG")
            (root / category / f"{category}-{i:02d}{suffix}").write_bytes(encode(image, fmt))
    return root


@contextmanager
def running_torchserve(state_dir, model_store, models):
    """A real TorchServe on free loopback ports, stopped (and checked stopped) on exit."""
    server = TorchServe(state_dir, model_store=model_store, ports={api: free_port() for api in ADDRESS_KEYS})
    server.start(models, timeout=240)
    try:
        yield server
    finally:
        server.stop()
    assert not server.running(), "TorchServe did not stop"
