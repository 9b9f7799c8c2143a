"""Fashion-MNIST from Debian's dataset-fashion-mnist (idx files) to a folder of PNGs per category."""
import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
CATEGORIES = ("t-shirt-top", "trouser", "pullover", "dress", "coat",
              "sandal", "shirt", "sneaker", "bag", "ankle-boot")
PARTS = {"train": "train", "test": "t10k"}


def read_idx(path):
    """An idx file (gzipped or not) as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape}, found {array.size} bytes")
    return array.reshape(shape)


def _find(source, stem):
    for name in (f"{stem}.gz", stem):
        if (source / name).is_file():
            return source / name
    raise FileNotFoundError(
        f"{source / stem}[.gz] not found: install the Debian package dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or pass --source")


def export_folders(out_dir, source=DEFAULT_SOURCE):
    """Writes out_dir/<category>/fmnist-<part>-<index>.png for all 70,000 images; returns the count.

    Ids are stable: the same source image always gets the same file name. Existing files are kept.
    """
    source, out_dir = Path(source), Path(out_dir)
    for category in CATEGORIES:
        (out_dir / category).mkdir(parents=True, exist_ok=True)
    total = 0
    for part, prefix in PARTS.items():
        images = read_idx(_find(source, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(source, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise ValueError(f"{part}: {len(images)} images but {len(labels)} labels")
        for i in tqdm(range(len(images)), desc=f"fashion-mnist {part}", unit="img"):
            path = out_dir / CATEGORIES[labels[i]] / f"fmnist-{part}-{i:05d}.png"
            if not path.exists():
                Image.fromarray(images[i], mode="L").save(path)
        total += len(images)
    return total
