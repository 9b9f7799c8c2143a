"""Session fixtures: one tiny trained model, its bundle, its archive and a real TorchServe serving it."""
import json

import pytest

from serving.build_archive import main as build_archive
from tests.fixtures import IMAGE_SIZE, running_torchserve, write_photo_folder
from training.build_index import main as build_index
from training.train import main as train

MODEL_NAME = "tiny-search"


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory):
    return write_photo_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def trained_run(photo_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(["--data-dir", str(photo_dir), "--out-dir", str(run), "--image-size", str(IMAGE_SIZE), "--epochs", "2",
           "--batch-size", "6", "--lr", "0.0003", "--workers", "0", "--seed", "7"])
    return run


@pytest.fixture(scope="session")
def bundle_dir(trained_run, photo_dir):
    out = trained_run / "bundle"
    build_index(["--checkpoint", str(trained_run / "last.pt"), "--data-dir", str(photo_dir), "--out-dir", str(out),
                 "--all", "--workers", "0", "--batch-size", "8", "--runtime", "torch-fp32"])
    return out


@pytest.fixture(scope="session")
def model_store(bundle_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("model_store")
    # A long batch delay so that concurrent test requests land in one batch.
    build_archive(["--bundle", str(bundle_dir), "--name", MODEL_NAME, "--version", "1.0", "--model-store",
                   str(store), "--batch-size", "4", "--max-batch-delay", "400", "--startup-timeout", "120"])
    return store


@pytest.fixture(scope="session")
def torchserve(model_store, tmp_path_factory):
    with running_torchserve(tmp_path_factory.mktemp("torchserve"), model_store, [f"{MODEL_NAME}.mar"]) as server:
        yield server


@pytest.fixture(scope="session")
def manifest(bundle_dir):
    return json.loads((bundle_dir / "manifest.json").read_text())
