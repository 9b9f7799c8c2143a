"""Every photo a run uses is decoded before it starts; broken ones are named by path, and --skip-bad leaves them out."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from serving.torchserve import ROOT
from tests.fixtures import IMAGE_SIZE, encode, product_photo, write_photo_folder
from training.build_index import main as build_index
from training.checkpoint import save_checkpoint
from training.dataset import ItemDataset, UnreadablePhotoError
from training.photo_check import BAD_PHOTOS_FILE, BadPhotosError, find_bad_photos
from training.train import build_model
from training.train import main as train
from visual_search.catalogue.store import open_catalogue
from visual_search.items import read_csv, scan_folder, subsample, write_csv
from visual_search.preprocessing import PreprocessSettings, eval_transform


def break_photos(root):
    """Three kinds of broken file a marketplace dump holds; returns their paths."""
    good_jpeg = encode(product_photo("shoes", seed=1, size=(200, 150)), "JPEG")
    broken = {root / "shoes" / "truncated.jpg": good_jpeg[:len(good_jpeg) // 2],
              root / "bags" / "garbage.png": b"<html>not found</html>",
              root / "phones" / "empty.webp": b""}
    for path, data in broken.items():
        path.write_bytes(data)
    return sorted(str(p) for p in broken)


@pytest.fixture
def photos(tmp_path):
    root = write_photo_folder(tmp_path / "photos", per_category=5)
    return root, break_photos(root)


def train_args(photos, out, *extra):
    return ["--data-dir", str(photos), "--out-dir", str(out), "--image-size", str(IMAGE_SIZE), "--batch-size", "4",
            "--workers", "0", "--seed", "3", *extra]


def test_unreadable_photos_are_listed_by_path_with_a_reason(photos):
    root, broken = photos
    bad = find_bad_photos(root, scan_folder(root), size=IMAGE_SIZE, workers=2)  # in two loader processes
    assert sorted(path for path, _ in bad) == broken
    reasons = dict(bad)
    assert reasons[str(root / "shoes" / "truncated.jpg")].startswith("corrupt or truncated image")
    assert reasons[str(root / "bags" / "garbage.png")].startswith("not an image")
    assert reasons[str(root / "phones" / "empty.webp")].startswith("empty body")


def test_training_stops_before_it_starts_and_names_every_bad_photo(photos, tmp_path):
    root, broken = photos
    with pytest.raises(BadPhotosError) as raised:
        train(train_args(root, tmp_path / "run", "--epochs", "1"))
    for path in broken:
        assert path in str(raised.value)
    listed = (tmp_path / "run" / BAD_PHOTOS_FILE).read_text().splitlines()
    assert sorted(line.split(",")[0] for line in listed[1:]) == broken
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "train.csv").exists()


def test_skip_bad_trains_without_them_and_writes_the_list(photos, tmp_path):
    root, broken = photos
    run = tmp_path / "run"
    history = train(train_args(root, run, "--epochs", "1", "--skip-bad"))
    assert [h["epoch"] for h in history] == [1] and (run / "last.pt").is_file()
    used = {it.id for it in read_csv(run / "train.csv") + read_csv(run / "val.csv")}
    assert used == {it.id for it in scan_folder(root)} - {"truncated", "garbage", "empty"}
    assert sorted(line.split(",")[0] for line in (run / BAD_PHOTOS_FILE).read_text().splitlines()[1:]) == broken


def test_only_the_photos_a_run_uses_are_checked(photos, tmp_path):
    """The demo trains on a subset of a large folder: broken files outside it do not stop it."""
    root, _ = photos
    chosen = {it.id for it in subsample(scan_folder(root), 2, seed=3)}
    assert not chosen & {"truncated", "garbage", "empty"}, "the test needs a seed whose subset leaves them out"
    history = train(train_args(root, tmp_path / "run", "--epochs", "0", "--max-per-category", "2"))
    assert history == [] and not (tmp_path / "run" / BAD_PHOTOS_FILE).exists()


def test_index_build_checks_the_catalogue_photos(photos, tmp_path):
    root, broken = photos
    model = build_model(3)
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scheduler=None,
                    epoch=0, categories=["bags", "phones", "shoes"],
                    preprocess=PreprocessSettings(image_size=IMAGE_SIZE), metrics={}, args={})
    common = ["--checkpoint", str(checkpoint), "--data-dir", str(root), "--runtime", "torch-fp32", "--all",
              "--workers", "0"]
    with pytest.raises(BadPhotosError):
        build_index(common + ["--out-dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused" / "embeddings.npy").exists()

    manifest = build_index(common + ["--out-dir", str(tmp_path / "bundle"), "--skip-bad"])
    ids = [it.id for it in open_catalogue(tmp_path / "bundle" / "catalogue").all_items()]
    assert manifest["catalogue"]["count"] == len(ids) == 15 and not {"truncated", "garbage", "empty"} & set(ids)
    assert np.load(tmp_path / "bundle" / "embeddings.npy").shape == (15, 2048)
    assert (tmp_path / "bundle" / BAD_PHOTOS_FILE).read_text().count("\n") == 4

    good = [it for it in scan_folder(root) if it.id not in {"truncated", "garbage", "empty"}]
    write_csv(good, tmp_path / "good.csv")  # a catalogue list that leaves the broken files out: nothing to skip
    build_index(common[:-3] + ["--catalogue", str(tmp_path / "good.csv"), "--workers", "0",
                               "--out-dir", str(tmp_path / "listed")])
    assert not (tmp_path / "listed" / BAD_PHOTOS_FILE).exists()


def test_a_photo_that_breaks_after_the_check_is_named(photos):
    root, _ = photos
    items = [it for it in scan_folder(root) if it.id == "truncated"]
    dataset = ItemDataset(root, items, eval_transform(PreprocessSettings(image_size=IMAGE_SIZE)), ["shoes"])
    with pytest.raises(UnreadablePhotoError, match="truncated.jpg"):
        dataset[0]


def test_the_command_line_prints_an_error_line_not_a_traceback(photos, tmp_path):
    root, broken = photos
    result = subprocess.run([sys.executable, "-m", "training.train", *train_args(root, tmp_path / "run"),
                             "--epochs", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.replace("\r", "\n").splitlines()
    assert any(line.startswith("error: 3 photo(s) cannot be decoded") for line in lines), result.stderr[-2000:]
    for path in broken:
        assert path in result.stderr
