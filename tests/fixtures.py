"""Small real inputs for the tests: synthetic product photos, a trained tiny model, its bundle and archive."""
from contextlib import contextmanager
from pathlib import Path

from loadtests.photos import CATEGORIES, encode, product_photo
from serving.torchserve import ADDRESS_KEYS, TorchServe, free_port

IMAGE_SIZE = 32  # the tests' model input; the service default is 225


def write_photo_folder(root, per_category=8, seed=0, prefix=""):
    """root/<category>/<prefix><category>-NN.{png,jpg}: a user's folder of photos, mixed formats and modes."""
    root = Path(root)
    for c, category in enumerate(CATEGORIES):
        (root / category).mkdir(parents=True, exist_ok=True)
        for i in range(per_category):
            mode = "L" if i % 4 == 3 else "RGB"
            image = product_photo(category, seed=seed + 100 * c + i, mode=mode)
            suffix, fmt = (".jpg", "JPEG") if i % 2 else (".png", "PNG")
            (root / category / f"{prefix}{category}-{i:02d}{suffix}").write_bytes(encode(image, fmt))
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
