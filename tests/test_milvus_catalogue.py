"""A Milvus collection as a catalogue, against a real Milvus Lite server and brute force: IVF_SQ8 and HNSW
collections published from embeddings answer exact distances, exactly k under filters and exclusions, search by
listing; a collection is published once; a worker refuses a collection other than the one its archive pins."""
import json
import shutil

import numpy as np
import pytest

from training.publish_milvus import publish_embeddings
from visual_search.bundle import MANIFEST_FILE, load_bundle
from visual_search.catalogue.milvus import (
    MilvusSettings,
    collection_reference,
    open_collection,
)
from visual_search.catalogue.search import SearchRequest
from visual_search.catalogue.vectors import l2_normalize
from visual_search.errors import BundleError, CatalogueError, CatalogueUnavailable, FilterError, UnknownListingError
from visual_search.items import Item

COUNT, RARE = 600, 5  # items; items of the rare category
CATEGORIES = ("common", "other", "rare")


def items():
    return [Item(f"m{i:04d}", "rare" if i < RARE else CATEGORIES[i % 2], f"x/m{i:04d}.jpg") for i in range(COUNT)]


@pytest.fixture(scope="module")
def vectors():
    return l2_normalize(np.random.default_rng(3).standard_normal((COUNT, 2048), dtype=np.float32))


@pytest.fixture(scope="module", params=["ivf_sq8", "hnsw"])
def collection(request, milvus, vectors):
    settings = MilvusSettings(milvus.uri, f"approximate_{request.param}", timeout=30)
    publish_embeddings(settings, vectors, items(), categories=CATEGORIES, profile="accurate",
                       hnsw=request.param == "hnsw", chunk_rows=256, progress=False)
    catalogue = open_collection(settings)
    yield catalogue
    catalogue.close()


def brute_force(vectors, query, allowed):
    distances = ((vectors - query) ** 2).sum(axis=1)
    order = [i for i in np.argsort(distances, kind="stable") if allowed[i]]
    return order, distances


def test_answers_carry_exact_distances_nearest_first(collection, vectors):
    queries = l2_normalize(np.random.default_rng(4).standard_normal((5, 2048), dtype=np.float32))
    for hits, query in zip(collection.answer([SearchRequest(k=10, vector=q) for q in queries]), queries):
        _, distances = brute_force(vectors, query, np.ones(COUNT, bool))
        found = [int(n.id[1:]) for n in hits.neighbours]
        assert len(found) == 10
        assert [n.distance for n in hits.neighbours] == pytest.approx(distances[found].tolist(), abs=1e-4)
        assert [n.distance for n in hits.neighbours] == sorted(n.distance for n in hits.neighbours)


def test_exactly_k_whenever_the_filtered_set_holds_k(collection, vectors):
    query = vectors[300] + 0.01
    rare = collection.answer([SearchRequest(k=RARE, vector=query, categories=("rare",))])[0]
    assert sorted(n.id for n in rare.neighbours) == [f"m{i:04d}" for i in range(RARE)]
    left_out = ("m0001", "m0003")
    fewer = collection.answer([SearchRequest(k=RARE, vector=query, categories=("rare",), exclude=left_out)])[0]
    assert len(fewer.neighbours) == RARE - 2 and not set(left_out) & {n.id for n in fewer.neighbours}
    other = collection.answer([SearchRequest(k=50, vector=query, categories=("other",))])[0]
    assert len(other.neighbours) == 50 and {n.category for n in other.neighbours} == {"other"}
    everything_rare = tuple(f"m{i:04d}" for i in range(RARE))
    (refused,) = collection.answer([SearchRequest(k=2, vector=query, categories=("rare",), exclude=everything_rare)])
    assert isinstance(refused, FilterError) and "every matching item is left out" in refused.reason
    (unknown,) = collection.answer([SearchRequest(k=2, vector=query, categories=("hats",))])
    assert isinstance(unknown, FilterError) and "unknown category" in unknown.reason


def test_search_by_listing_uses_its_stored_vector_and_leaves_it_out(collection, vectors):
    hits = collection.answer([SearchRequest(k=3, listing="m0042")])[0]
    assert hits.listing.id == "m0042" and "m0042" not in {n.id for n in hits.neighbours}
    _, distances = brute_force(vectors, vectors[42], np.ones(COUNT, bool))
    assert [n.distance for n in hits.neighbours] == pytest.approx([distances[int(n.id[1:])] for n in hits.neighbours],
                                                                  abs=1e-4)
    (missing,) = collection.answer([SearchRequest(k=3, listing="nope")])
    assert isinstance(missing, UnknownListingError) and missing.status == 404


def test_a_collection_is_published_once(collection, vectors):
    with pytest.raises(FileExistsError, match="published once"):
        publish_embeddings(collection.settings, vectors[:10], items()[:10], progress=False)


def test_a_worker_refuses_a_collection_other_than_the_pinned_one(collection, bundle_dir, tmp_path):
    reference = collection_reference(collection.settings, collection.identity)
    with pytest.raises(CatalogueError, match="uid"):
        open_collection(collection.settings, expect={**reference, "uid": "another-catalogue"})
    with pytest.raises(CatalogueError, match="count"):
        open_collection(collection.settings, expect={**reference, "count": COUNT + 1})
    archive = tmp_path / "archive"
    shutil.copytree(bundle_dir, archive, ignore=shutil.ignore_patterns("catalogue"))
    manifest = json.loads((archive / MANIFEST_FILE).read_text())
    manifest["catalogue"] = {**reference, "uid": "another-catalogue"}
    (archive / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not the catalogue this archive was built for"):
        load_bundle(archive, milvus=collection.settings.to_dict())
    with pytest.raises(BundleError, match="handler.milvus"):
        load_bundle(archive)


def test_an_unreachable_server_is_a_503_not_a_crash(milvus):
    from serving.torchserve import free_port  # noqa: PLC0415

    settings = MilvusSettings(f"http://127.0.0.1:{free_port()}", "none", timeout=1)
    with pytest.raises(CatalogueUnavailable) as raised:
        open_collection(settings)
    assert raised.value.status == 503 and "did not answer" in raised.value.reason


def test_settings_refuse_unknown_names_and_take_the_uri_from_the_environment(monkeypatch):
    settings = MilvusSettings("http://milvus:19530", "shop", timeout=3)
    assert MilvusSettings.from_dict(settings.to_dict()) == settings and "token" not in settings.to_dict()
    with pytest.raises(CatalogueError, match="unknown milvus settings colection"):
        MilvusSettings.from_dict({"uri": "http://milvus:19530", "colection": "shop"})
    monkeypatch.setenv("VISUAL_SEARCH_MILVUS_URI", "http://elsewhere:19530")
    assert MilvusSettings.from_dict(settings.to_dict()).uri == "http://elsewhere:19530"
