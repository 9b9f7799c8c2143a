"""Catalogue items (id, category, image reference): scanning a folder per category, the seeded split, CSV I/O."""
import csv
import random
from dataclasses import dataclass
from pathlib import Path

from .images import IMAGE_SUFFIXES

FIELDS = ("id", "category", "image")


@dataclass(frozen=True)
class Item:
    id: str
    category: str
    image: str  # a path relative to the catalogue root, or a URL the marketplace serves


def scan_folder(root):
    """Items of `root/<category>/<image file>`; the id is the file name without its suffix."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    categories = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not categories:
        raise ValueError(f"{root} has no category folders: expected {root}/<category>/<image files>")
    items, seen = [], {}
    for category in categories:
        for path in sorted((root / category).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            if path.stem in seen:
                raise ValueError(f"duplicate id {path.stem!r}: {seen[path.stem]} and {path}")
            seen[path.stem] = path
            items.append(Item(path.stem, category, f"{category}/{path.name}"))
    if not items:
        raise ValueError(f"no images under {root} (looked for {sorted(IMAGE_SUFFIXES)})")
    return items


def split_items(items, val_fraction=0.3, seed=42):
    """Seeded split inside each category, so both sides keep every category. Returns (train, val)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    by_category = {}
    for item in items:
        by_category.setdefault(item.category, []).append(item)
    rng = random.Random(seed)
    train, val = [], []
    for category in sorted(by_category):
        group = sorted(by_category[category], key=lambda it: it.id)
        rng.shuffle(group)
        n_val = round(len(group) * val_fraction)
        if len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    return train, val


def subsample(items, per_category, seed=0):
    """At most `per_category` items of each category, chosen with a seed; order is kept."""
    if per_category is None:
        return list(items)
    rng = random.Random(seed)
    by_category = {}
    for item in items:
        by_category.setdefault(item.category, []).append(item)
    keep = set()
    for group in by_category.values():
        keep.update(it.id for it in rng.sample(group, min(per_category, len(group))))
    return [it for it in items if it.id in keep]


def write_csv(items, path):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        writer.writerows((it.id, it.category, it.image) for it in items)


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if tuple(header or ()) != FIELDS:
            raise ValueError(f"{path}: expected the header {','.join(FIELDS)}, found {header}")
        return [Item(*row) for row in reader]
