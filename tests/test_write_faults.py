"""Writes that survive kill -9: a writer of a real line is killed with SIGKILL at random points, again and again,
while it adds, removes, folds and publishes; after each kill every version recorded opens and verifies in full,
every change that returned is in the log, nothing half-written is visible, and a rerun completes. Two writers at
once: both land, or one is refused, none mixed."""
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from loadtests.photos import encode, product_photo
from serving.torchserve import ROOT
from serving.version_record import changes_path, read_record
from tests.fixtures import CATEGORIES
from training.next_version import main as next_version
from visual_search.bundle import load_bundle
from visual_search.catalogue import verify_catalogue

MODEL = "faulty-search"
KILLS = 20


@pytest.fixture(scope="module")
def line(bundle_dir, photo_dir, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("faults")
    store, images = root / "store", root / "images"
    shutil.copytree(photo_dir, images)
    next_version(["--name", MODEL, "--model-store", str(store), "--bundle", str(bundle_dir), "--data-dir",
                  str(images)])
    return {"root": root, "store": store, "images": images}


class Driver:
    """tests.write_driver in a process of its own, its stdout read line by line."""

    def __init__(self, line, seed, first=None):
        command = [sys.executable, "-m", "tests.write_driver", "--name", MODEL, "--model-store", str(line["store"]),
                   "--work", str(line["root"] / "work"), "--seed", str(seed), *(["--first", first] if first else [])]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True)
        self.lines, self.ready = [], threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for text in self.process.stdout:
            line = json.loads(text)
            if line.get("ready"):
                self.ready.set()
            self.lines.append(line)

    def wait_for_begin(self, kind, timeout=300):
        """Waits until the writer starts a write of `kind`; False if it does not within `timeout`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(line.get("begin") == kind for line in self.lines):
                return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)
        time.sleep(0.2)  # the reader thread takes the last lines
        return [line for line in self.lines if "done" in line]


VERIFIED = {}  # (path, inode, size, mtime): files already verified in full, which nothing rewrites in place


def verified(path, check):
    """Runs `check` on `path` unless the same file (inode, size, mtime) passed it before."""
    stat = os.stat(path)
    identity = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if identity not in VERIFIED:
        assert check(path), path
        VERIFIED[identity] = True


def verify_bundle(folder):
    bundle = load_bundle(folder)
    try:
        verify_catalogue(bundle.catalogue.folder, progress=False)
    finally:
        bundle.catalogue.close()
    return True


def check_line(line, reported):
    """What must hold whenever no writer runs, however the last one ended."""
    store = line["store"]
    log = changes_path(store, MODEL)
    if log.exists():
        with sqlite3.connect(log) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            rows = {seq: (op, item_id, vector) for seq, op, item_id, vector in
                    db.execute("SELECT seq, op, id, vector FROM changes")}
        for op, _, vector in rows.values():  # no half change: an add always holds its whole vector
            assert op in ("add", "remove") and (len(vector) == 8192 if op == "add" else vector is None)
        for done in reported:
            if done["done"] in ("add", "remove"):
                assert rows.get(done["seq"], (None, None))[:2] == (done["done"], done["id"]), done
    versions = read_record(store, MODEL)["versions"]
    assert [v["version"] for v in versions] == [f"{n}.0" for n in range(1, len(versions) + 1)]
    assert {d["version"] for d in reported if d["done"] == "version"} <= {v["version"] for v in versions}
    for entry in versions:
        verified(store / entry["archive"], lambda path: zipfile.ZipFile(path).testzip() is None)
        verified(Path(entry["bundle"]) / "manifest.json", lambda _, entry=entry: verify_bundle(entry["bundle"]))
    for archive in store.glob("*.mar"):  # an archive is whole or absent, recorded or not
        verified(archive, lambda path: zipfile.ZipFile(path).testzip() is None)
    bundles = Path(versions[0]["bundle"]).parent
    for folder in bundles.glob(f"{MODEL}-v*"):  # a bundle folder appears complete or not at all
        assert (folder / "manifest.json").is_file(), folder


# Where a kill lands after the write begins, in seconds: an add embeds a photo and commits; a removal only commits;
# a fold or a publication builds a catalogue, a bundle and an archive.
KILL_WITHIN = {"add": 0.5, "remove": 0.05, "compact": 8.0, "publish": 8.0}


def test_sigkill_at_random_points_loses_no_change_and_leaves_nothing_half_written(line):
    rng = random.Random(20261201)
    reported, killed_in = [], []
    for kill in range(KILLS):
        kind = list(KILL_WITHIN)[kill % len(KILL_WITHIN)]
        driver = Driver(line, seed=kill, first=kind)
        assert driver.ready.wait(300), "the writer did not start"
        began = driver.wait_for_begin(kind)
        time.sleep(rng.uniform(0, KILL_WITHIN[kind]))
        reported += driver.kill()
        killed_in.append(kind if began else None)
        check_line(line, reported)
        if kind in ("compact", "publish"):  # a rerun completes, and clears what the kill left
            try:
                next_version(["--name", MODEL, "--model-store", str(line["store"]), "--compact"])
            except SystemExit as stop:
                assert "nothing to fold" in str(stop), stop
            check_line(line, reported)
    assert set(killed_in) >= set(KILL_WITHIN), killed_in  # kills fell inside every kind of write
    assert {d["done"] for d in reported} >= {"add", "remove"}


def test_two_writers_at_once_both_land_or_one_is_refused(line, tmp_path):
    photos = []
    for i, category in enumerate(CATEGORIES[:2]):
        path = tmp_path / f"{category}.jpg"
        path.write_bytes(encode(product_photo(category, 9100 + i, size=(64, 48)), "JPEG"))
        photos.append((f"twin-{category}", category, path))
    adds = [subprocess.Popen([sys.executable, "-m", "serving.listings", "--name", MODEL, "--model-store",
                              str(line["store"]), "add", "--id", item_id, "--category", category, "--photo", str(path)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for item_id, category, path in photos]
    outcomes = [process.communicate(timeout=300) for process in adds]
    assert all(process.returncode == 0 for process in adds), outcomes
    seqs = [json.loads(out)["seq"] for out, _ in outcomes]
    assert len(set(seqs)) == 2  # both landed, one after the other
    before = len(read_record(line["store"], MODEL)["versions"])
    folds = [subprocess.Popen([sys.executable, "-m", "training.next_version", "--name", MODEL, "--model-store",
                               str(line["store"]), "--compact"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [process.communicate(timeout=600) for process in folds]
    codes = sorted(process.returncode for process in folds)
    versions = read_record(line["store"], MODEL)["versions"]
    # at once, the second is refused by the line's lock; after the first, it finds nothing left to fold
    assert codes == [0, 1], results
    refused = next(err for (_, err), process in zip(results, folds) if process.returncode)
    assert "being written by another process" in refused or "nothing to fold" in refused, refused
    assert len(versions) == before + 1
    check_line(line, [])
    assert all(os.path.exists(line["store"] / v["archive"]) for v in versions)
    assert not list(Path(line["store"]).glob(".*.partial"))
