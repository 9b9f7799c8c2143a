"""Catalogue data: Fashion-MNIST idx export, folder scanning, the seeded split."""
import gzip
import struct

import numpy as np
import pytest

from training.fashion_mnist import CATEGORIES, export_folders, read_idx
from visual_search.images import open_image
from visual_search.items import read_csv, scan_folder, split_items, subsample, write_csv


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_source(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_idx_export_writes_one_folder_per_category_with_stable_ids(idx_source, tmp_path):
    out = tmp_path / "images"
    assert export_folders(out, idx_source) == 17
    items = scan_folder(out)
    assert len(items) == 17
    assert {it.category for it in items} <= set(CATEGORIES)
    first = out / CATEGORIES[0] / "fmnist-train-00000.png"
    pixels = np.asarray(open_image(first))
    assert pixels.shape == (28, 28, 3)
    assert np.array_equal(pixels[..., 0], read_idx(idx_source / "train-images-idx3-ubyte.gz")[0])
    assert export_folders(out, idx_source) == 17  # a second run keeps the same files and ids
    assert [it.id for it in scan_folder(out)] == [it.id for it in items]


def test_missing_source_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        export_folders(tmp_path / "out", tmp_path)


def test_a_users_photo_folder_scans_with_categories_and_image_references(photo_dir):
    items = scan_folder(photo_dir)
    assert sorted({it.category for it in items}) == ["bags", "phones", "shoes"]
    assert all((photo_dir / it.image).is_file() for it in items)
    assert len({it.id for it in items}) == len(items)


def test_scan_refuses_folders_without_categories(tmp_path):
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no category folders"):
        scan_folder(tmp_path)


def test_split_is_seeded_stratified_and_70_30(photo_dir):
    items = scan_folder(photo_dir) * 1
    train, val = split_items(items, 0.3, seed=42)
    again_train, again_val = split_items(list(reversed(items)), 0.3, seed=42)
    assert [it.id for it in train] == [it.id for it in again_train] and [it.id for it in val] == [
        it.id for it in again_val]
    assert not {it.id for it in train} & {it.id for it in val}
    assert len(train) + len(val) == len(items)
    for category in ("bags", "phones", "shoes"):
        n_val = sum(it.category == category for it in val)
        assert n_val == round(8 * 0.3)
    other_train, _ = split_items(items, 0.3, seed=1)
    assert [it.id for it in other_train] != [it.id for it in train]


def test_subsample_and_csv_round_trip(photo_dir, tmp_path):
    items = subsample(scan_folder(photo_dir), 2, seed=0)
    assert len(items) == 6
    write_csv(items, tmp_path / "items.csv")
    assert read_csv(tmp_path / "items.csv") == items
    (tmp_path / "bad.csv").write_text("name,label\nx,y\n")
    with pytest.raises(ValueError, match="header"):
        read_csv(tmp_path / "bad.csv")
