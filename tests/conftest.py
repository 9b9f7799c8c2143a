"""Session fixtures: one tiny trained model, its bundle, its archive and a real TorchServe serving it; a bundle
whose near-duplicate threshold is calibrated."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from serving.build_archive import main as build_archive
from tests.fixtures import CATEGORIES, IMAGE_SIZE, running_torchserve, write_photo_folder
from tests.harness import smooth_model
from training.alterations import altered_copies
from training.build_index import main as build_index
from training.calibration import calibrate_model, embed_uploads
from training.publish import publish_bundle, weights_sha256
from training.train import main as train
from visual_search.items import scan_folder, write_csv
from visual_search.model import TrainedModel
from visual_search.preprocessing import PreprocessSettings
from visual_search.runtime import Runtime

MODEL_NAME = "tiny-search"
FAISS_MODEL, MILVUS_MODEL = "faiss-exact", "milvus-flat"  # the same items, two engines (milvus_pair)
MILVUS_TIMEOUT = 3.0  # s per Milvus call in the served archive


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
    """The session's bundle: torch fp32, and no near-duplicate thresholds (tests/test_duplicates_serving.py builds
    a calibrated one)."""
    out = trained_run / "bundle"
    build_index(["--checkpoint", str(trained_run / "last.pt"), "--data-dir", str(photo_dir), "--out-dir", str(out),
                 "--all", "--workers", "0", "--batch-size", "8", "--runtime", "torch-fp32",
                 "--no-duplicates-calibration"])
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


@pytest.fixture(scope="session")
def held_out_dir(tmp_path_factory):
    """Photos of the same categories that no catalogue holds (ids held-...), and their list, held-out.csv."""
    root = tmp_path_factory.mktemp("held-out")
    photos = write_photo_folder(root / "photos", seed=5000, prefix="held-")
    write_csv(scan_folder(photos), root / "held-out.csv")
    return photos


REPOSTED = {"bags-01": ("resize", "watermark"), "shoes-02": ("watermark",)}  # listed again, altered


@pytest.fixture(scope="session")
def duplicates_catalogue_photos(photo_dir, tmp_path_factory):
    """The photo folder's 24 listings, and re-posts of some of them: altered copies listed under new ids
    (repost-<listing>-<alteration>), in a catalogue image folder of their own."""
    root = tmp_path_factory.mktemp("catalogue-photos") / "photos"
    shutil.copytree(photo_dir, root)
    for listing, alterations in REPOSTED.items():
        path = next(root.glob(f"*/{listing}.*"))
        with Image.open(path) as image:
            for name, data, _ in altered_copies(image.copy(), np.random.default_rng(1), alterations):
                (path.parent / f"repost-{listing}-{name}.png").write_bytes(data)
    return root


@pytest.fixture(scope="session")
def calibrated_bundle_dir(duplicates_catalogue_photos, held_out_dir, tmp_path_factory):
    """A bundle whose catalogue (duplicates_catalogue_photos) records a near-duplicate threshold, calibrated on
    the held-out photos. Its model is tests.harness.smooth_model: the 2-epoch tiny model's embeddings all lie
    within 1e-7 of each other, which no threshold can separate."""
    out = tmp_path_factory.mktemp("calibrated") / "bundle"
    root = duplicates_catalogue_photos
    preprocess = PreprocessSettings(image_size=IMAGE_SIZE)
    items = scan_folder(root)
    photos = [(root / it.image).read_bytes() for it in items]
    model = smooth_model(preprocess, photos)
    embeddings = embed_uploads(Runtime(TrainedModel(model, preprocess)), photos)
    duplicates = calibrate_model(model, preprocess, True, "cpu", held_out_dir.parent / "held-out.csv", held_out_dir,
                                 embeddings, items, weights_sha256(model), listings=0, image_root=root)
    publish_bundle(out, model=model, categories=CATEGORIES, preprocess=preprocess, items=items,
                   embeddings=embeddings, normalize=True, image_root=root, duplicates=duplicates,
                   notes="near-duplicate tests", progress=False)
    return out


@pytest.fixture(scope="session")
def milvus(tmp_path_factory):
    """A real Milvus Lite server on a free loopback port, stopped by its pid at the end."""
    from tests.milvus_server import running_milvus  # noqa: PLC0415

    with running_milvus(tmp_path_factory.mktemp("milvus") / "data") as server:
        yield server


@pytest.fixture(scope="session")
def milvus_pair(bundle_dir, photo_dir, milvus, tmp_path_factory):
    """One TorchServe serving the same items twice, 2 workers each: FAISS_MODEL searches the bundle's exact
    catalogue folder (and follows its change log), MILVUS_MODEL a FLAT Milvus collection published from that
    folder. The two lines' writers make the same live changes."""
    from serving.listings import ListingWriter, MilvusListingWriter  # noqa: PLC0415
    from training.publish_milvus import publish_folder  # noqa: PLC0415
    from visual_search.bundle import catalogue_folder, read_manifest  # noqa: PLC0415
    from visual_search.catalogue.milvus import MilvusSettings  # noqa: PLC0415

    root = tmp_path_factory.mktemp("milvus-pair")
    store = root / "store"
    settings = MilvusSettings(milvus.uri, "tiny_flat", timeout=MILVUS_TIMEOUT)
    publish_folder(settings, catalogue_folder(bundle_dir, read_manifest(bundle_dir)), profile="exact", progress=False)
    common = ["--bundle", str(bundle_dir), "--model-store", str(store), "--workers", "2", "--batch-size", "4",
              "--max-batch-delay", "20", "--startup-timeout", "120", "--response-timeout", "30"]
    build_archive([*common, "--name", FAISS_MODEL])
    build_archive([*common, "--name", MILVUS_MODEL, "--milvus-uri", milvus.uri, "--milvus-collection",
                   settings.collection, "--milvus-timeout", str(MILVUS_TIMEOUT)])
    with running_torchserve(root / "ts", store, [f"{FAISS_MODEL}.mar", f"{MILVUS_MODEL}.mar"]) as server:
        writers = {FAISS_MODEL: ListingWriter(bundle_dir, store / f"{FAISS_MODEL}.changes.sqlite", FAISS_MODEL),
                   MILVUS_MODEL: MilvusListingWriter(bundle_dir, settings, MILVUS_MODEL)}
        try:
            yield {"server": server, "milvus": milvus, "settings": settings, "writers": writers, "store": store}
        finally:
            for writer in writers.values():
                writer.close()
