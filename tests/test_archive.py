"""The .mar archive: what it carries, and the bundle validation that refuses a mismatched one at load time."""
import json
import shutil
import zipfile

import pytest
import torch
import yaml

from tests.conftest import MODEL_NAME
from training.build_index import EMBEDDINGS_FILE
from training.publish import publish_bundle, write_bundle
from visual_search.bundle import BUNDLE_FILES, load_bundle
from visual_search.catalogue.manifest import INDEX_FILE, ITEMS_FILE
from visual_search.catalogue.manifest import MANIFEST_FILE as CATALOGUE_MANIFEST
from visual_search.errors import BundleError


def test_archive_carries_handler_package_bundle_and_model_config(model_store):
    with zipfile.ZipFile(model_store / f"{MODEL_NAME}.mar") as archive:
        names = set(archive.namelist())
        mar_manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(archive.read("model-config.yaml"))
    assert set(BUNDLE_FILES) <= names
    assert {f"catalogue/{name}" for name in (INDEX_FILE, ITEMS_FILE, CATALOGUE_MANIFEST)} <= names
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
    assert bundle.catalogue.index.d == 2048 == manifest["embedding_dim"]
    catalogue = bundle.catalogue.manifest  # the one owner of the catalogue's facts; the bundle holds its reference
    assert bundle.catalogue.index.ntotal == bundle.catalogue.count == catalogue["count"] == 24
    assert manifest["catalogue"]["bundled"] and manifest["catalogue"]["count"] == 24
    assert catalogue["profile"] == "exact" and catalogue["factory"] == "Flat"
    assert bundle.categories == ["bags", "phones", "shoes"] == catalogue["categories"]
    assert not {"num_items", "catalogue_categories", "index_profile", "index_factory"} & set(manifest)
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


def edit_reference(bundle, **changes):
    reference = json.loads((bundle / "manifest.json").read_text())["catalogue"]
    edit_manifest(bundle, catalogue={**reference, **changes})


@pytest.mark.parametrize("changes,message", [
    ({"embedding_dim": 1000}, "embedding_dim 1000"),
    ({"format_version": 1}, "format_version 1, this code reads 2: rebuild the bundle"),
    ({"categories": ["bags", "phones"]}, r"head weight \(3, 2048\), expected \(2, 2048\)"),
    ({"weights_sha256": "0" * 64}, "model.pt does not match"),
])
def test_mismatched_manifest_fails_loudly(bundle_copy, changes, message):
    edit_manifest(bundle_copy, **changes)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("changes,message", [
    ({"count": 25}, "count 24, expected 25"),
    ({"uid": "0" * 32}, "uid '[0-9a-f]{32}', expected '0{32}'"),
    ({"normalized": False}, "normalized True, expected False"),
])
def test_a_catalogue_that_is_not_the_expected_one_fails(bundle_copy, changes, message):
    edit_reference(bundle_copy, **changes)
    with pytest.raises(BundleError, match=f"not the catalogue this archive was built for: .*{message}"):
        load_bundle(bundle_copy)


def test_another_catalogue_swapped_in_fails(bundle_copy, bundle_dir, tmp_path):
    """The same items published again: another catalogue version with the same count, refused by its uid."""
    source = load_bundle(bundle_dir)
    other = tmp_path / "other"
    publish_bundle(other, model=source.model, categories=source.categories, preprocess=source.preprocess,
                   items=source.catalogue.all_items(), embeddings=bundle_dir / EMBEDDINGS_FILE,
                   normalize=source.normalize, progress=False)
    shutil.rmtree(bundle_copy / "catalogue")
    shutil.copytree(other / "catalogue", bundle_copy / "catalogue")
    with pytest.raises(BundleError, match="not the catalogue this archive was built for: uid"):
        load_bundle(bundle_copy)


def test_a_truncated_catalogue_file_fails(bundle_copy):
    index = bundle_copy / "catalogue" / INDEX_FILE
    index.chmod(0o644)
    with open(index, "r+b") as f:
        f.truncate(index.stat().st_size - 100)
    with pytest.raises(BundleError, match=f"{INDEX_FILE} is .* bytes.*truncated"):
        load_bundle(bundle_copy)


def test_a_missing_catalogue_folder_fails(bundle_copy):
    shutil.rmtree(bundle_copy / "catalogue")
    with pytest.raises(BundleError, match="catalogue folder .*catalogue not found .*24 items"):
        load_bundle(bundle_copy)
    (bundle_copy / "model.pt").unlink()
    with pytest.raises(BundleError, match="lacks model.pt"):
        load_bundle(bundle_copy)


def test_write_bundle_refuses_a_catalogue_of_other_vectors(bundle_dir, tmp_path):
    bundle = load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="holds unit-length vectors; the bundle would embed queries raw"):
        write_bundle(tmp_path, model=bundle.model, categories=bundle.categories, preprocess=bundle.preprocess,
                     catalogue_dir=bundle_dir / "catalogue", normalize=False)


def test_weights_file_holds_tensors_only(bundle_dir):
    state = torch.load(bundle_dir / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["head.weight"].shape == (3, 2048)
