"""Near-duplicates through a real TorchServe over HTTP: an altered copy of a catalogue photo is reported as a
near-duplicate of its listing and a different listing of the same category is not; re-posted listings found by
listing; every channel; diverse answers; the 409 of a catalogue without a threshold; the scan of the same catalogue."""
import base64
import csv
import io

import numpy as np
import pytest
import requests
from PIL import Image

from serving.build_archive import main as build_archive
from tests.conftest import MODEL_NAME, REPOSTED
from tests.fixtures import running_torchserve
from training.alterations import ALTERATIONS
from training.duplicates import main as scan_main
from visual_search.bundle import load_bundle

NAME = "dup-search"
ALTERED = ("resize", "watermark")  # the alterations this test model's calibration recalls best (checked below)


@pytest.fixture(scope="module")
def catalogue(calibrated_bundle_dir):
    bundle = load_bundle(calibrated_bundle_dir)
    yield bundle.catalogue
    bundle.catalogue.close()


@pytest.fixture(scope="module")
def record(catalogue):
    return catalogue.manifest["duplicates"]


@pytest.fixture(scope="module")
def server(calibrated_bundle_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("dup-store")
    build_archive(["--bundle", str(calibrated_bundle_dir), "--name", NAME, "--version", "1.0", "--model-store",
                   str(store), "--batch-size", "4", "--max-batch-delay", "20", "--startup-timeout", "120"])
    with running_torchserve(tmp_path_factory.mktemp("dup-ts"), store, [f"{NAME}.mar"]) as running:
        yield running


def post(server, name=NAME, **kwargs):
    return requests.post(f"{server.urls['inference']}/predictions/{name}", timeout=60,
                         **{**kwargs, "headers": {**server.headers(), **kwargs.get("headers", {})}})


def photo_of(root, item):
    return (root / item.image).read_bytes()


def altered(root, item, name, seed=11):
    with Image.open(root / item.image) as image:
        data, _ = ALTERATIONS[name](image.copy(), np.random.default_rng(seed))
    return data


def listings(answer):
    return [n["id"] for n in answer["duplicates"]["listings"]]


def originals(catalogue):
    return [it for it in catalogue.all_items() if not it.id.startswith("repost-")]


def limit(record, category):
    """The threshold the service applies to a listing of `category`."""
    return record["by_category"].get(category, record["threshold"])


def test_the_test_model_is_calibrated_and_recalls_the_alterations_used_here(record):
    assert record["precision"] >= record["target_precision"] == 0.99
    assert set(record["by_category"]) == {"bags", "phones", "shoes"}  # 72 copies each: thresholds of their own
    assert all(value is not None for value in record["by_category"].values())
    for name in ALTERED:
        assert record["alterations"][name]["recall"] >= 0.9, (name, record["alterations"][name])


def test_an_altered_copy_of_a_catalogue_photo_is_reported_as_a_near_duplicate_of_its_listing(
        server, catalogue, record, duplicates_catalogue_photos):
    root = duplicates_catalogue_photos
    for item in originals(catalogue)[::5]:
        for name in ALTERED:
            response = post(server, data=altered(root, item, name), headers={"X-Duplicates": "true"})
            assert response.status_code == 200, response.text
            answer = response.json()
            found = answer["duplicates"]
            assert found["threshold"] == limit(record, answer["category"]) and found["calibrated"] is True
            assert found["precision"] == record["precision"] and found["recall"] == record["recall"]
            assert found["per_category"] is True
            assert item.id in listings(answer), (item.id, name, found)
            for n in found["listings"]:
                assert n["distance"] <= n["threshold"] == limit(record, n["category"])
            assert found["more"] is False
            assert len(answer["neighbours"]) == 4 and answer["neighbours"][0]["id"] in listings(answer)
            reposts = {f"repost-{item.id}-{a}" for a in REPOSTED.get(item.id, ())}
            assert set(listings(answer)) == {item.id, *reposts}, (item.id, name, found)


def test_a_different_listing_of_the_same_category_is_not_a_near_duplicate(
        server, catalogue, record, duplicates_catalogue_photos):
    items = catalogue.all_items()
    for item in originals(catalogue)[::5]:
        own = {item.id, *(f"repost-{item.id}-{a}" for a in REPOSTED.get(item.id, ()))}
        others = [it for it in items if it.category == item.category and it.id not in own]
        response = post(server, data=altered(duplicates_catalogue_photos, item, "resize"),
                        headers={"X-Duplicates": "true"})
        assert not set(listings(response.json())) & {it.id for it in others}
        reposts = [f"repost-{item.id}-{a}" for a in REPOSTED.get(item.id, ())]
        answer = post(server, json={"listing": item.id, "duplicates": True, "category": item.category,
                                    **({"exclude": reposts} if reposts else {})}).json()
        assert item.id not in listings(answer) and answer["listing"]["id"] == item.id  # the listing left out
        assert listings(answer) == [], (item.id, answer["duplicates"])
        assert {n["id"] for n in answer["neighbours"]} <= {it.id for it in others}
        assert min(n["distance"] for n in answer["neighbours"]) > limit(record, item.category)
        assert answer["duplicates"]["threshold"] == limit(record, item.category)  # the listing's category's


def test_re_posted_listings_are_found_from_the_listing_they_copy(server):
    for listing, alterations in REPOSTED.items():
        answer = post(server, data=f"listing={listing}&duplicates=true",
                      headers={"Content-Type": "application/x-www-form-urlencoded"}).json()
        assert sorted(listings(answer)) == sorted(f"repost-{listing}-{a}" for a in alterations), answer
        own_category = post(server, json={"listing": listing, "duplicates": True,
                                          "category": answer["listing"]["category"]}).json()
        assert listings(own_category) == listings(answer)
        excluded = post(server, json={"listing": listing, "duplicates": True,
                                      "exclude": listings(answer)[:1]}).json()
        assert listings(excluded) == listings(answer)[1:]


def test_the_duplicates_parameter_comes_from_every_channel(server, catalogue, duplicates_catalogue_photos):
    item = originals(catalogue)[3]
    image = altered(duplicates_catalogue_photos, item, "watermark")
    url = server.urls["inference"]
    answers = [
        post(server, data=image, headers={"X-Duplicates": "true"}),
        post(server, files={"image": ("p.png", image, "image/png")}, data={"duplicates": "yes"}),
        post(server, json={"image": base64.b64encode(image).decode(), "duplicates": True}),
        requests.post(f"{url}/models/{NAME}/invoke?duplicates=1", data=image, headers=server.headers(), timeout=60),
    ]
    for response in answers:
        assert response.status_code == 200, response.text
    assert len({str(r.json()["duplicates"]) for r in answers}) == 1 and item.id in listings(answers[0].json())
    plain = post(server, data=image, headers={"X-Duplicates": "false"}).json()
    assert "duplicates" not in plain and "diverse" not in plain


def test_diverse_answers_collapse_re_posts_and_still_hold_k(server, catalogue, record, duplicates_catalogue_photos):
    listing = next(iter(REPOSTED))
    item = next(it for it in catalogue.all_items() if it.id == listing)
    image = photo_of(duplicates_catalogue_photos, item)
    for k in (2, 4, 8):
        plain = post(server, data=image, headers={"X-Top-K": str(k)}).json()
        diverse = post(server, data=image, headers={"X-Top-K": str(k), "X-Diverse": "true"}).json()
        ids = [n["id"] for n in diverse["neighbours"]]
        assert len(ids) == k and diverse["k"] == k and ids[0] == plain["neighbours"][0]["id"]
        keys = catalogue.items.keys_of(ids)
        vectors = catalogue.vectors.get([keys[i] for i in ids])
        distances = ((vectors[:, None, :] - vectors[None, :, :]) ** 2).sum(axis=-1)
        for later, neighbour in enumerate(diverse["neighbours"]):  # farther than its threshold from every earlier
            assert (distances[later, :later] > limit(record, neighbour["category"])).all(), ids
        group = {listing, *(f"repost-{listing}-{a}" for a in REPOSTED[listing])}
        assert len(group & set(ids)) == 1
        assert len(group & {n["id"] for n in plain["neighbours"]}) == min(k, len(group))
        assert diverse["diverse"]["collapsed"] >= min(k, len(group)) - 1 and diverse["diverse"]["calibrated"]
    both = post(server, json={"listing": listing, "diverse": True, "duplicates": True, "k": 3}).json()
    assert len(both["neighbours"]) == 3 and len(listings(both)) == len(REPOSTED[listing])


def test_bad_duplicates_parameters_get_a_400_with_a_reason(server, catalogue, duplicates_catalogue_photos):
    image = photo_of(duplicates_catalogue_photos, originals(catalogue)[0])
    for headers, reason in (({"X-Duplicates": "maybe"}, "duplicates must be true or false, not 'maybe'"),
                            ({"X-Diverse": "2"}, "diverse must be true or false"),
                            ({"X-Duplicates": "true", "X-Duplicate-Threshold": "5"}, "at most 4, not 5.0"),
                            ({"X-Duplicate-Threshold": "close"}, "duplicate_threshold must be a number")):
        response = post(server, data=image, headers=headers)
        assert response.status_code == 400 and reason in response.json()["error"], response.text
    assert post(server, data=image).status_code == 200


def test_a_catalogue_without_a_threshold_refuses_with_a_409_unless_the_request_gives_one(torchserve, catalogue,
                                                                                          duplicates_catalogue_photos):
    image = photo_of(duplicates_catalogue_photos, originals(catalogue)[0])
    for headers in ({"X-Duplicates": "true"}, {"X-Diverse": "true"}):
        response = post(torchserve, MODEL_NAME, data=image, headers=headers)
        assert response.status_code == 409, response.text
        assert response.json()["status"] == 409 and "duplicate_threshold" in response.json()["error"]
    given = post(torchserve, MODEL_NAME, data=image, headers={"X-Duplicates": "true", "X-Duplicate-Threshold": "0.5"})
    assert given.status_code == 200, given.text
    found = given.json()["duplicates"]
    assert found["threshold"] == 0.5 and found["calibrated"] is False and found["precision"] is None
    assert post(torchserve, MODEL_NAME, data=image).status_code == 200


def test_the_scan_groups_each_listing_with_its_re_posts(calibrated_bundle_dir, catalogue, duplicates_catalogue_photos,
                                                        tmp_path):
    report = scan_main([str(catalogue.folder), "--out", str(tmp_path / "scan"), "--images",
                        str(duplicates_catalogue_photos)])
    rows = list(csv.DictReader(io.StringIO((tmp_path / "scan" / "groups.csv").read_text())))
    groups = {}
    for row in rows:
        groups.setdefault(row["group"], []).append((row["id"], float(row["distance"])))
    expected = [{listing, *(f"repost-{listing}-{a}" for a in alterations)}
                for listing, alterations in sorted(REPOSTED.items(), key=lambda kv: -len(kv[1]))]
    assert [{item_id for item_id, _ in group} for group in groups.values()] == expected, groups
    for group in groups.values():  # the first is the one published first: the lowest key
        keys = catalogue.items.keys_of([item_id for item_id, _ in group])
        assert [keys[item_id] for item_id, _ in group] == sorted(keys.values()) and group[0][1] == 0.0
    assert report["threshold_from"] == "calibrated" and (tmp_path / "scan" / "groups.png").is_file()
