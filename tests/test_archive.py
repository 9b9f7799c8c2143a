"""The .mar archive: what it carries, and the bundle validation that refuses a mismatched one at load time."""
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import MODEL_NAME
from visual_search.bundle import BUNDLE_FILES, BundleError, load_bundle, write_bundle
from visual_search.catalogue import read_csv, write_csv
from visual_search.index import build_index, l2_normalize


def test_archive_carries_handler_package_bundle_and_model_config(model_store):
    with zipfile.ZipFile(model_store / f"{MODEL_NAME}.mar") as archive:
        names = set(archive.namelist())
        mar_manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(archive.read("model-config.yaml"))
    assert set(BUNDLE_FILES) <= names
    assert {"visual_search_handler.py", "visual_search/__init__.py", "visual_search/bundle.py",
            "visual_search/preprocessing.py"} <= names
    assert not any(name.endswith((".pkl", ".pickle", ".pyc")) for name in names)
    assert mar_manifest["model"]["modelName"] == MODEL_NAME and mar_manifest["model"]["modelVersion"] == "1.0"
    assert mar_manifest["model"]["handler"] == "visual_search_handler.py"
    assert config["batchSize"] == 4 and config["maxBatchDelay"] == 400
    assert {"minWorkers", "maxWorkers", "responseTimeout", "startupTimeout"} <= set(config)
    assert config["handler"]["default_k"] == 4


def test_bundle_loads_with_consistent_counts_and_dimensions(bundle_dir, manifest):
    bundle = load_bundle(bundle_dir)
    assert bundle.index.d == 2048 == manifest["embedding_dim"]
    assert bundle.index.ntotal == len(bundle.items) == manifest["num_items"] == 24
    assert bundle.categories == ["bags", "phones", "shoes"]
    assert not bundle.model.training
    assert tuple(bundle.model.head.weight.shape) == (3, 2048)


@pytest.fixture
def bundle_copy(bundle_dir, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    return copy


def edit_manifest(bundle, **changes):
    path = bundle / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes,message", [
    ({"num_items": 25}, "catalogue.csv has 24 rows, manifest says 25"),
    ({"embedding_dim": 1000}, "embedding_dim 1000"),
    ({"format_version": 99}, "format_version 99"),
    ({"categories": ["bags", "phones"]}, r"head weight \(3, 2048\), expected \(2, 2048\)"),
    ({"weights_sha256": "0" * 64}, "model.pt does not match"),
])
def test_mismatched_manifest_fails_loudly(bundle_copy, changes, message):
    edit_manifest(bundle_copy, **changes)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def test_a_reordered_catalogue_with_the_same_rows_fails(bundle_copy):
    items = read_csv(bundle_copy / "catalogue.csv")
    write_csv(items[1:] + items[:1], bundle_copy / "catalogue.csv")  # same rows, ids no longer match the vectors
    with pytest.raises(BundleError, match="catalogue.csv does not match the checksum"):
        load_bundle(bundle_copy)


def test_a_manifest_without_the_catalogue_checksum_fails(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["catalogue_sha256"]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no catalogue_sha256 .*rebuild the bundle"):
        load_bundle(bundle_copy)


def test_missing_file_or_fewer_rows_than_vectors_fails(bundle_copy):
    items = read_csv(bundle_copy / "catalogue.csv")
    write_csv(items[:-1], bundle_copy / "catalogue.csv")
    edit_manifest(bundle_copy, num_items=23)
    with pytest.raises(BundleError, match="24 vectors but the catalogue has 23"):
        load_bundle(bundle_copy, verify_checksums=False)
    (bundle_copy / "catalogue.faiss").unlink()
    with pytest.raises(BundleError, match="lacks catalogue.faiss"):
        load_bundle(bundle_copy)


def test_write_bundle_refuses_an_index_that_does_not_match_the_items(bundle_dir, tmp_path):
    bundle = load_bundle(bundle_dir)
    index = build_index(l2_normalize(np.ones((3, 2048), dtype=np.float32)))
    with pytest.raises(BundleError, match="3 vectors for 24 items"):
        write_bundle(tmp_path, model=bundle.model, categories=bundle.categories, preprocess=bundle.preprocess,
                     index=index, items=bundle.items, index_factory="Flat", normalize=True)


def test_weights_file_holds_tensors_only(bundle_dir):
    state = torch.load(bundle_dir / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["head.weight"].shape == (3, 2048)
