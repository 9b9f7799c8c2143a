"""A large catalogue through the real TorchServe over HTTP: 20,000 vectors derived from real model embeddings, an
IVF index ("accurate" profile: IVF256,SQ8, nprobe 8, re-ranked), served from the archive (bundled) and from a
folder outside it (memory-mapped, named relative to $VISUAL_SEARCH_CATALOGUES, 2 workers).

The vectors: a calibrated tiny ResNet-50 (benchmarks.inprocess) embeds 90 product photos; the catalogue rows are
interpolations between each photo's embedding and one of its nearest photos' plus noise shaped like their spread
(benchmarks.synthetic_catalogue). Photo queries are some of those photos, as when a listed product is photographed
again. Recall is measured against exact search (numpy over the same stored vectors) with the embedding the server
itself computed (output=embedding).
"""
import base64
import filecmp
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from benchmarks import synthetic_catalogue as synthetic
from serving.build_archive import main as build_archive
from serving.management_client import ManagementClient, ManagementError
from tests.fixtures import CATEGORIES, IMAGE_SIZE, encode, product_photo, running_torchserve
from tests.harness import calibrated_model, embed_photos
from training.publish import write_bundle
from visual_search.bundle import CATALOGUE_DIR
from visual_search.catalogue.build import publish_catalogue, update_catalogue
from visual_search.catalogue.manifest import INDEX_FILE, read_manifest
from visual_search.catalogue.vectors import segment_name
from visual_search.fileio import CATALOGUES_ENV
from visual_search.items import Item
from visual_search.preprocessing import PreprocessSettings

N_ITEMS = 20_000
PHOTOS_PER_CATEGORY = 30
K = 10
RARE_EVERY = 100  # every 100th item is "rare" (200 items: a filtered set small enough to be scanned exactly)
CATALOGUE_CATEGORIES = [*CATEGORIES, "rare", "empty"]  # "empty" holds no item
BUNDLED, OUTSIDE, BROKEN = "large-bundled", "large-outside", "large-broken"
# Workers of one thread each (the handler gives each worker cores // maxWorkers threads) and batches of one, so that
# the same request is computed the same way whichever worker and archive answers it. The outside catalogue gets 2
# workers; the bundled one starts 1 (memory).
ARCHIVE_OPTIONS = ["--version", "1.0", "--max-workers", "2", "--batch-size", "1", "--max-batch-delay", "5",
                   "--startup-timeout", "120", "--max-k", "50"]
# Mean recall@10 against exact search over the queries of a test (measured on this data in brackets).
RECALL_BOUND = 0.95  # unfiltered, and by listing (1.0)
OWN_CATEGORY_RECALL_BOUND = 0.95  # filtered to the photo's own category (1.0)
# Filtered to another category, whose nearest items lie far from the photo and spread over many lists: 0.84 with
# the profile's filter_factor 2 (0.95 with 4, 0.99 with 8, measured in process on 30 photos).
OTHER_CATEGORY_RECALL_BOUND = 0.7


def item_id(key):
    return f"sku-{key:05d}"


def hard_link_copy(source, target):
    """A copy of a catalogue folder whose files are the same inodes (they are read-only and never rewritten)."""
    target.mkdir()
    for name in os.listdir(source):
        os.link(source / name, target / name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The photos, the catalogue (published, then moved under catalogues/ as a serving host holds it), its stored
    vectors, and two bundles of one model: one with the catalogue inside, one naming it outside."""
    root = tmp_path_factory.mktemp("large")
    preprocess = PreprocessSettings(image_size=IMAGE_SIZE)
    photo_categories = [c for c in CATEGORIES for _ in range(PHOTOS_PER_CATEGORY)]
    photos = [encode(product_photo(c, seed=1000 * CATEGORIES.index(c) + i))
              for c in CATEGORIES for i in range(PHOTOS_PER_CATEGORY)]
    model = calibrated_model(preprocess, photos[::3], seed=0)
    generator = synthetic.fit(embed_photos(model, preprocess, photos), photo_categories, seed=0)
    sources, vectors = zip(*synthetic.rows(generator, N_ITEMS, seed=1))
    sources, vectors = np.concatenate(sources), np.concatenate(vectors)
    categories = ["rare" if key % RARE_EVERY == 7 else photo_categories[s] for key, s in enumerate(sources)]
    items = [Item(item_id(key), c, f"{c}/{item_id(key)}.jpg") for key, c in enumerate(categories)]

    published = root / "published" / "shop"
    publish_catalogue(published, vectors, items, categories=CATALOGUE_CATEGORIES, profile="accurate",
                      progress=False)
    bundled = root / "bundle-bundled"
    bundled.mkdir()
    hard_link_copy(published, bundled / CATALOGUE_DIR)  # the same files, inside the bundle
    common = dict(model=model, categories=CATEGORIES, preprocess=preprocess, normalize=True)
    write_bundle(bundled, catalogue_dir=bundled / CATALOGUE_DIR, **common)
    write_bundle(root / "bundle-outside", catalogue_dir=published, **common)
    # Serving hosts hold catalogues under $VISUAL_SEARCH_CATALOGUES, not at the path it was published to.
    catalogues = root / "catalogues"
    catalogues.mkdir()
    published.rename(catalogues / "shop")
    shop = catalogues / "shop"
    stored = np.load(shop / segment_name(0), allow_pickle=False)  # the vectors as the catalogue stores them
    return {"root": root, "catalogues": catalogues, "shop": shop, "photos": photos, "items": items,
            "categories": np.array(categories), "stored": stored, "norms": (stored ** 2).sum(axis=1),
            "manifest": read_manifest(shop),
            "photo_categories": photo_categories}


@pytest.fixture(scope="module")
def catalogues_env(world):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CATALOGUES_ENV, str(world["catalogues"]))  # TorchServe's workers inherit it
        yield world["catalogues"]


@pytest.fixture(scope="module")
def store(world, catalogues_env):
    """Archives: the catalogue bundled; outside (relative name "shop"); and outside as "broken", a folder that the
    load-failure test spoils after the archive was built."""
    store = world["root"] / "store"
    build_archive(["--bundle", str(world["root"] / "bundle-bundled"), "--name", BUNDLED, "--model-store", str(store),
                   "--workers", "1", *ARCHIVE_OPTIONS])
    hard_link_copy(world["shop"], catalogues_env / "broken")
    for name, folder, workers in ((OUTSIDE, "shop", "2"), (BROKEN, "broken", "1")):
        build_archive(["--bundle", str(world["root"] / "bundle-outside"), "--name", name, "--catalogue-dir", folder,
                       "--model-store", str(store), "--workers", workers, *ARCHIVE_OPTIONS])
    return store


@pytest.fixture(scope="module")
def server(store, catalogues_env, tmp_path_factory):
    with running_torchserve(tmp_path_factory.mktemp("ts-large"), store, [f"{BUNDLED}.mar", f"{OUTSIDE}.mar"]
                            ) as server:
        yield server


def predict(server, model, photo=None, headers=None, json_body=None, files=None, timeout=60):
    url = f"{server.urls['inference']}/predictions/{model}"
    headers = {**server.headers(), **(headers or {})}
    if json_body is not None:
        return requests.post(url, json=json_body, headers=headers, timeout=timeout)
    if files is not None:
        return requests.post(url, files=files, headers=headers, timeout=timeout)
    if photo is not None:
        headers["Content-Type"] = "image/png"
    return requests.post(url, data=photo, headers=headers, timeout=timeout)


def answer(response, status=200):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def served_embedding(server, photo):
    return np.array(answer(predict(server, OUTSIDE, photo, {"X-Output": "embedding"}))["embedding"],
                    dtype=np.float32)


def exact(world, query, k, categories=(), exclude=()):
    """Exact top-k (ids, squared L2 distances) over the stored vectors of the items the filter lets through."""
    distances = world["norms"] - 2 * world["stored"] @ query + query @ query
    allowed = np.ones(len(distances), dtype=bool)
    if categories:
        allowed &= np.isin(world["categories"], list(categories))
    for excluded in exclude:
        allowed[int(excluded.removeprefix("sku-"))] = False
    distances[~allowed] = np.inf
    top = np.argsort(distances, kind="stable")[:k]
    return [item_id(key) for key in top], distances[top]


def recall(found, expected):
    return len(set(found) & set(expected)) / len(expected)


def neighbour_ids(result):
    return [n["id"] for n in result["neighbours"]]


def query_photos(world, per_category=4):
    """(photo, its category): photos of listed products, the first few source photos of each category."""
    return [(world["photos"][c * PHOTOS_PER_CATEGORY + i], category) for c, category in enumerate(CATEGORIES)
            for i in range(per_category)]


# ------------------------------------------------------------------------------------------------- the index

def test_the_catalogue_is_an_ivf_index_with_its_search_parameters(server, world):
    manifest = world["manifest"]
    assert manifest["factory"] == "IVF256,SQ8" and manifest["count"] == N_ITEMS
    assert manifest["search"] == {"nprobe": 8, "k_factor": 2, "filter_factor": 2}
    response = requests.get(f"{server.urls['management']}/models/{OUTSIDE}", params={"customized": "true"},
                            headers=server.headers("management"), timeout=60)
    description = response.json()[0]["customizedMetadata"]
    description = json.loads(description) if isinstance(description, str) else description
    assert description["catalogue"]["uid"] == manifest["uid"] and not description["catalogue"]["bundled"]
    assert description["catalogue"]["factory"] == "IVF256,SQ8" and description["items"] == N_ITEMS


def test_exactly_k_neighbours_with_recall_against_exact_search(server, world):
    recalls = []
    for photo, _ in query_photos(world):
        query = served_embedding(server, photo)
        for k in (1, K, 37):
            result = answer(predict(server, OUTSIDE, photo, {"X-Top-K": str(k)}))
            assert result["k"] == k and len(result["neighbours"]) == k
            expected, _ = exact(world, query, k)
            if k == K:
                recalls.append(recall(neighbour_ids(result), expected))
            # Every distance answered is the exact squared L2 distance to the stored vector (re-ranked).
            keys = [int(i.removeprefix("sku-")) for i in neighbour_ids(result)]
            exact_distances = ((world["stored"][keys] - query) ** 2).sum(axis=1)
            np.testing.assert_allclose([n["distance"] for n in result["neighbours"]], exact_distances, atol=2e-6)
    assert np.mean(recalls) >= RECALL_BOUND, recalls


def test_category_filter_returns_k_from_the_category_with_recall(server, world):
    own, other = [], []
    for photo, photo_category in query_photos(world, per_category=2):
        query = served_embedding(server, photo)
        for category in CATEGORIES:
            result = answer(predict(server, OUTSIDE, photo, {"X-Top-K": str(K), "X-Category": category}))
            assert len(result["neighbours"]) == K
            assert {n["category"] for n in result["neighbours"]} == {category}
            found = recall(neighbour_ids(result), exact(world, query, K, [category])[0])
            (own if category == photo_category else other).append(found)
        # Two categories, one of them small: still k, from those two only.
        result = answer(predict(server, OUTSIDE, photo, {"X-Top-K": str(K), "X-Category": "rare,shoes"}))
        assert len(result["neighbours"]) == K and {n["category"] for n in result["neighbours"]} <= {"rare", "shoes"}
        # A category of 200 items is scanned exactly from the stored vectors.
        result = answer(predict(server, OUTSIDE, photo, {"X-Top-K": str(K), "X-Category": "rare"}))
        assert neighbour_ids(result) == exact(world, query, K, ["rare"])[0]
    assert np.mean(own) >= OWN_CATEGORY_RECALL_BOUND, own
    assert np.mean(other) >= OTHER_CATEGORY_RECALL_BOUND, other


def listing_ids(world, per_category=3):
    """Listings of each catalogue category but "empty", spread over the keys."""
    keys = [int(k) for c in ("bags", "phones", "shoes", "rare")
            for k in np.flatnonzero(world["categories"] == c)[::997][:per_category]]
    return [item_id(key) for key in keys]


# ------------------------------------------------------------------------------------------------- filters

def test_excluded_ids_never_come_back_and_k_is_still_answered(server, world):
    for photo, category in query_photos(world, per_category=1):
        query = served_embedding(server, photo)
        first = neighbour_ids(answer(predict(server, OUTSIDE, photo, {"X-Top-K": str(K)})))
        # The same filter through each channel: header, multipart form field, JSON field.
        channels = [
            predict(server, OUTSIDE, photo, {"X-Top-K": str(K), "X-Exclude": ",".join(first)}),
            predict(server, OUTSIDE, files={"image": ("photo.png", photo, "image/png"), "k": (None, str(K)),
                                            "exclude": (None, ",".join(first))}),
            predict(server, OUTSIDE, json_body={"image": base64.b64encode(photo).decode(), "k": K, "exclude": first}),
        ]
        results = [answer(response) for response in channels]
        assert results[0] == results[1] == results[2]
        found = neighbour_ids(results[0])
        assert len(found) == K and not set(found) & set(first)
        assert recall(found, exact(world, query, K, exclude=first)[0]) >= RECALL_BOUND
        # Category and exclusion together: the category's nearest, without the excluded ones.
        in_category = neighbour_ids(answer(predict(server, OUTSIDE, photo, {"X-Top-K": str(K),
                                                                              "X-Category": category})))
        result = answer(predict(server, OUTSIDE, photo, {"X-Top-K": str(K), "X-Category": category,
                                                         "X-Exclude": ",".join(in_category[:5])}))
        found = neighbour_ids(result)
        assert len(found) == K and not set(found) & set(in_category[:5])
        assert {n["category"] for n in result["neighbours"]} == {category}
        assert recall(found, exact(world, query, K, [category], in_category[:5])[0]) >= OWN_CATEGORY_RECALL_BOUND


def test_a_filter_that_matches_nothing_is_a_400_with_its_reason(server, world):
    photo = query_photos(world, per_category=1)[0][0]
    rare = [item_id(int(key)) for key in np.flatnonzero(world["categories"] == "rare")]
    cases = [
        ({"X-Category": "empty"}, None, "the category holds no items"),
        (None, {"listing": item_id(1), "category": "empty"}, "the category holds no items"),
        (None, {"image": base64.b64encode(photo).decode(), "category": "rare", "exclude": rare},
         "every matching item is left out"),
        ({"X-Category": "hats"}, None, "unknown category 'hats'; this catalogue has: bags, phones, shoes, rare, empty"),
    ]
    for headers, body, reason in cases:
        response = predict(server, OUTSIDE, photo if body is None else None, headers, json_body=body)
        error = answer(response, 400)
        assert error["status"] == 400 and reason in error["error"], error


# ------------------------------------------------------------------------------------------------- by listing

def test_search_by_listing_leaves_the_listing_out(server, world):
    recalls = []
    for listing in listing_ids(world):
        key = int(listing.removeprefix("sku-"))
        item = world["items"][key]
        channels = [predict(server, OUTSIDE, headers={"X-Listing": listing, "X-Top-K": str(K)}),
                    predict(server, OUTSIDE, files={"listing": (None, listing), "k": (None, str(K))}),
                    predict(server, OUTSIDE, json_body={"listing": listing, "k": K})]
        results = [answer(response) for response in channels]
        assert results[0] == results[1] == results[2]
        result = results[0]
        assert result["listing"] == {"id": listing, "category": item.category, "image": item.image}
        assert result["confidence"] is None and result["category"] == item.category
        found = neighbour_ids(result)
        assert len(found) == K and listing not in found
        expected, _ = exact(world, world["stored"][key], K, exclude=[listing])
        recalls.append(recall(found, expected))
        # With its own category as the filter, and with another one: k, the listing still left out.
        for category in (item.category, "bags" if item.category != "bags" else "shoes"):
            filtered = answer(predict(server, OUTSIDE, json_body={"listing": listing, "k": K, "category": category}))
            found = neighbour_ids(filtered)
            assert len(found) == K and listing not in found
            assert {n["category"] for n in filtered["neighbours"]} == {category}
    assert np.mean(recalls) >= RECALL_BOUND, recalls


def test_an_unknown_listing_is_a_404_with_its_reason(server):
    for response in (predict(server, OUTSIDE, headers={"X-Listing": "sku-99999"}),
                     predict(server, OUTSIDE, json_body={"listing": "no-such-id", "category": "bags"})):
        error = answer(response, 404)
        assert error["status"] == 404 and "unknown listing id" in error["error"] and "not in this catalogue" in \
            error["error"], error


# ------------------------------------------------------------------------------------------------- outside

def worker_pids(server, model):
    """The PIDs of the model's workers, all READY."""
    response = requests.get(f"{server.urls['management']}/models/{model}", headers=server.headers("management"),
                            timeout=60)
    workers = response.json()[0]["workers"]
    assert {w["status"] for w in workers} == {"READY"}
    return [int(w["pid"]) for w in workers]


def mapped_files(pid):
    """The files that process `pid` has mapped (/proc/PID/maps)."""
    with open(f"/proc/{pid}/maps") as maps:
        fields = [line.split(maxsplit=5) for line in maps]
    return {f[5].strip() for f in fields if len(f) == 6}


def answering_workers(server, model, since):
    """The TorchServe worker threads (W-<port>-<model>) that logged an inference after byte `since` of the log."""
    log = (server.state_dir / "logs" / "model_log.log").read_bytes()[since:].decode(errors="replace")
    return set(re.findall(rf"(W-\d+-{re.escape(model)}_[\d.]+)-stdout MODEL_LOG - Backend received inference", log))


def identity_requests(world):
    photos = [photo for photo, _ in query_photos(world, per_category=2)]
    listings = listing_ids(world, per_category=2)
    requests_ = [dict(photo=photo, headers={"X-Top-K": str(k)}) for photo, k in zip(photos, (1, 4, 10, 25, 50, 7))]
    requests_ += [dict(photo=photo, headers={"X-Top-K": "10", "X-Category": c})
                  for photo, c in zip(photos, ("bags", "rare", "shoes,rare", "phones", "bags,phones", "rare"))]
    requests_ += [dict(photo=photos[0], headers={"X-Exclude": ",".join(listings)})]
    requests_ += [dict(headers={"X-Listing": listing, "X-Top-K": "12"}) for listing in listings]
    requests_ += [dict(json_body={"listing": listings[0], "category": ["rare", "bags"], "k": 20})]
    return requests_


def test_outside_catalogue_on_two_workers_answers_as_the_bundled_one(server, world):
    log = server.state_dir / "logs" / "model_log.log"
    since = log.stat().st_size
    asks = identity_requests(world) * 2
    with ThreadPoolExecutor(4) as pool:
        outside = list(pool.map(lambda ask: answer(predict(server, OUTSIDE, **ask)), asks))
        bundled = list(pool.map(lambda ask: answer(predict(server, BUNDLED, **ask)), asks))
    assert [o["model"] for o in outside] == [OUTSIDE] * len(asks) and {b["model"] for b in bundled} == {BUNDLED}
    strip = lambda result: {key: value for key, value in result.items() if key != "model"}  # noqa: E731
    for ask, o, b in zip(asks, outside, bundled):
        assert strip(o) == strip(b), ask.get("headers") or ask.get("json_body")
    assert len(answering_workers(server, OUTSIDE, since)) == 2  # both workers answered
    # Both workers map the one outside folder's index, read-only; the bundled workers map their own copy.
    shop_index = str(world["shop"] / INDEX_FILE)
    outside_pids = worker_pids(server, OUTSIDE)
    assert len(outside_pids) == 2
    for pid in outside_pids:
        assert shop_index in mapped_files(pid)
    for pid in worker_pids(server, BUNDLED):
        files = mapped_files(pid)
        assert shop_index not in files and any(f.endswith(f"/{CATALOGUE_DIR}/{INDEX_FILE}") for f in files)


# ------------------------------------------------------------------------------------------------- refused at load

def register_refused(server, since):
    """Registers the broken archive; asserts TorchServe refuses it and returns (the tool's error message, the model
    log from `since`)."""
    client = ManagementClient.from_state(server.state_dir, timeout=120)
    with pytest.raises(ManagementError, match=f"HTTP 500: Failed to start workers for model {BROKEN}") as refused:
        client.register(f"{BROKEN}.mar", workers=1, ready_timeout=60)
    assert BROKEN not in client.model_names()  # TorchServe took the failed registration back
    return str(refused.value), (server.state_dir / "logs" / "model_log.log").read_bytes()[since:].decode(
        errors="replace")


def test_a_swapped_or_truncated_catalogue_file_is_refused_at_load(server, world, catalogues_env):
    """The archive was built, and checked, against an intact folder; the folder is then spoiled on the host."""
    broken, log = catalogues_env / "broken", server.state_dir / "logs" / "model_log.log"
    # Swapped: the index of the catalogue's next version (3 items removed, 3 added): same size, other bytes.
    other = world["root"] / "next"
    update_catalogue(world["shop"], other, add_items=[Item(f"new-{i}", "bags", "bags/new.jpg") for i in range(3)],
                     add_embeddings=world["stored"][100:103], remove_ids=[item_id(k) for k in (0, 9000, 19000)],
                     progress=False)
    index = broken / INDEX_FILE
    assert (other / INDEX_FILE).stat().st_size == index.stat().st_size
    assert not filecmp.cmp(other / INDEX_FILE, index, shallow=False)
    index.unlink()
    os.link(other / INDEX_FILE, index)
    message, text = register_refused(server, log.stat().st_size)
    reason = (f"BundleError: {broken}: {INDEX_FILE} is not the file this catalogue was published with (its sampled "
              f"bytes differ: swapped or modified)")
    assert reason in text, text[-3000:]
    assert message.endswith(f"the worker said: visual_search.errors.{reason}"), message  # what the operator sees
    index.unlink()
    os.link(world["shop"] / INDEX_FILE, index)

    # Truncated: the vector segment loses its last 8 KiB.
    segment = broken / segment_name(0)
    size = segment.stat().st_size
    segment.unlink()
    with open(world["shop"] / segment.name, "rb") as source, open(segment, "wb") as target:
        shutil.copyfileobj(source, target, 1 << 20)
        target.truncate(size - 8192)
    message, text = register_refused(server, log.stat().st_size)
    reason = f"BundleError: {broken}: {segment.name} is {size - 8192} bytes, the manifest says {size} (truncated)"
    assert reason in text and reason in message, (message, text[-3000:])

    # The same archive on the folder as published loads: it was the spoiled files that were refused.
    segment.unlink()
    os.link(world["shop"] / segment.name, segment)
    client = ManagementClient.from_state(server.state_dir, timeout=120)
    assert client.register(f"{BROKEN}.mar", workers=1, ready_timeout=120) == (BROKEN, "1.0")
    client.call("DELETE", f"/models/{BROKEN}/1.0")
