"""Near-duplicates without TorchServe: duplicates and diverse answers on real catalogue folders (Flat and IVF), the
catalogue scan on planted groups (real FAISS indexes, real files, the command line), the calibration's arithmetic and
alterations, and the calibration's way into manifests, updates and bundles."""
import csv
import io
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from tests.fixtures import CATEGORIES, product_photo
from training.alterations import ALTERATIONS, altered_copies
from training.calibration import MIN_COPIES, LabelledSet, curve, operating_point, record_of
from training.duplicates import UnionFind, scan_catalogue
from training.duplicates import main as scan_main
from training.publish import write_bundle
from visual_search.catalogue import SearchRequest, open_catalogue, publish_catalogue, update_catalogue
from visual_search.catalogue.duplicates import (
    FIRST_DEPTH,
    MAX_DUPLICATES,
    Plan,
    Threshold,
    calibrated_threshold,
    collapse,
    diverse_positions,
    finish,
    plan_of,
)
from visual_search.catalogue.vectors import l2_normalize
from visual_search.errors import BundleError, InputError
from visual_search.images import decode_image
from visual_search.items import Item
from visual_search.preprocessing import PreprocessSettings

DIM = 2048
THRESHOLD = 0.05
SPREAD = 0.1  # a copy lies about SPREAD**2 = 0.01 from its original; different vectors about 2 apart


def copies_of(vector, count, rng, spread=SPREAD):
    noise = rng.standard_normal((count, DIM)).astype(np.float32) / np.sqrt(DIM)
    return l2_normalize(vector[None, :] + spread * noise)


def planted_vectors(rng, singles=300, groups=(2, 3, 5, 12, 40)):
    """Unit vectors: `singles` unrelated ones, then groups of near-duplicates (the first of each its original);
    returns (vectors, [keys of each group])."""
    rows = [l2_normalize(rng.standard_normal((singles, DIM)).astype(np.float32))]
    members, key = [], singles
    for size in groups:
        base = l2_normalize(rng.standard_normal((1, DIM)).astype(np.float32))[0]
        rows.append(np.concatenate([base[None, :], copies_of(base, size - 1, rng)]))
        members.append(list(range(key, key + size)))
        key += size
    return np.concatenate(rows), members


def items_for(count):
    return [Item(f"sku-{key:05d}", CATEGORIES[key % 3], f"{CATEGORIES[key % 3]}/sku-{key:05d}.png")
            for key in range(count)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = np.random.default_rng(3)
    vectors, groups = planted_vectors(rng)
    root = tmp_path_factory.mktemp("planted")
    folders = {}
    for name, options in (("flat", {"profile": "exact"}), ("ivf", {"factory": "IVF8,SQ8"})):
        folders[name] = root / name
        publish_catalogue(folders[name], vectors, items_for(len(vectors)), categories=list(CATEGORIES),
                          progress=False, duplicates={"threshold": THRESHOLD, "weights_sha256": "w" * 64,
                                                      "precision": 0.99, "recall": 0.9}, **options)
    return {"root": root, "vectors": vectors, "groups": groups, "folders": folders, "rng": rng}


def answer(catalogue, request, **params):
    plan = plan_of({"k": request.k, **params}, calibrated_threshold(catalogue.manifest, "w" * 64),
                   catalogue.manifest)
    request = replace(request, k=plan.first_depth())
    results, extras = finish(catalogue, [request], catalogue.answer([request]), [plan])
    return results[0], extras[0]


def stored(catalogue, hits):
    keys = catalogue.items.keys_of([n.id for n in hits.neighbours])
    return catalogue.vectors.get([keys[n.id] for n in hits.neighbours])


def pairwise(vectors):
    return ((vectors[:, None, :] - vectors[None, :, :]) ** 2).sum(axis=-1)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_diverse_answers_still_hold_k_listings_no_two_within_the_threshold(planted, kind):
    catalogue = open_catalogue(planted["folders"][kind])
    try:
        for group in planted["groups"]:
            query = copies_of(planted["vectors"][group[0]], 1, planted["rng"])[0]
            for k in (1, 4, 10):
                plain, _ = answer(catalogue, SearchRequest(k=k, vector=query))
                hits, extra = answer(catalogue, SearchRequest(k=k, vector=query), diverse=True)
                assert len(hits.neighbours) == k and hits.k == k
                d = pairwise(stored(catalogue, hits))
                assert (d[~np.eye(k, dtype=bool)] > THRESHOLD).all(), (kind, len(group), k)
                assert hits.neighbours[0].id == plain.neighbours[0].id  # the nearest is always kept
                assert extra["diverse"]["threshold"] == THRESHOLD and extra["diverse"]["calibrated"] is True
                in_group = [n for n in plain.neighbours if int(n.id[4:]) in group]
                assert extra["diverse"]["collapsed"] >= min(len(group), k) - 1 if k > 1 else True
                assert sum(int(n.id[4:]) in group for n in hits.neighbours) == 1, (len(in_group), k)
    finally:
        catalogue.close()


def test_a_group_larger_than_the_first_search_is_collapsed_by_searching_deeper(planted):
    catalogue = open_catalogue(planted["folders"]["flat"])
    try:
        group = planted["groups"][-1]  # 40 near-duplicates: more than k x 4 for k = 4
        hits, extra = answer(catalogue, SearchRequest(k=4, vector=planted["vectors"][group[0]]), diverse=True)
        assert len(hits.neighbours) == 4 and extra["diverse"]["collapsed"] == len(group) - 1
        assert sum(int(n.id[4:]) in group for n in hits.neighbours) == 1
    finally:
        catalogue.close()


def test_a_diverse_answer_reads_the_neighbours_by_prefixes_and_keeps_what_the_whole_list_would(planted):
    catalogue = open_catalogue(planted["folders"]["flat"])
    try:
        group = planted["groups"][-1]  # 40 near-duplicates around the query: prefixes of 16 and 64 are needed
        hits = catalogue.answer([SearchRequest(k=256, vector=planted["vectors"][group[0]])])[0]
        for k in (1, 4, 10):
            plan = Plan(k, Threshold(THRESHOLD, False), diverse=True)
            whole = collapse(stored(catalogue, hits), THRESHOLD, k)
            assert diverse_positions(catalogue, hits.neighbours, plan) == whole and len(whole) == k
        assert diverse_positions(catalogue, hits.neighbours[:3], Plan(4, Threshold(THRESHOLD, False))) == [0]
    finally:
        catalogue.close()


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_duplicates_name_every_listing_within_the_threshold_with_filters_and_the_listing_left_out(planted, kind):
    catalogue = open_catalogue(planted["folders"][kind])
    try:
        for group in planted["groups"]:
            ids = [f"sku-{key:05d}" for key in group]
            hits, extra = answer(catalogue, SearchRequest(k=2, vector=planted["vectors"][group[0]]), duplicates=True)
            found = extra["duplicates"]
            assert sorted(n["id"] for n in found["listings"]) == ids and found["more"] is False
            assert found["threshold"] == THRESHOLD and found["calibrated"] and found["precision"] == 0.99
            assert all(n["distance"] <= THRESHOLD for n in found["listings"]) and len(hits.neighbours) == 2
            by_listing, extra = answer(catalogue, SearchRequest(k=2, listing=ids[1]), duplicates=True)
            assert sorted(n["id"] for n in extra["duplicates"]["listings"]) == [ids[0], *ids[2:]]
            shoes = [i for i in ids if catalogue.listing(i)[1].category == "shoes"]
            _, extra = answer(catalogue, SearchRequest(k=2, vector=planted["vectors"][group[0]],
                                                      categories=("shoes",), exclude=tuple(shoes[:1])),
                              duplicates=True)
            assert sorted(n["id"] for n in extra["duplicates"]["listings"]) == shoes[1:]
        single, extra = answer(catalogue, SearchRequest(k=3, vector=planted["vectors"][7]), duplicates=True,
                               diverse=True)
        assert [n["id"] for n in extra["duplicates"]["listings"]] == ["sku-00007"] and len(single.neighbours) == 3
    finally:
        catalogue.close()


def test_duplicates_are_bounded_and_say_when_there_are_more(tmp_path):
    rng = np.random.default_rng(5)
    base = l2_normalize(rng.standard_normal((1, DIM)).astype(np.float32))[0]
    vectors = np.concatenate([copies_of(base, MAX_DUPLICATES + 30, rng, 0.05),
                              l2_normalize(rng.standard_normal((50, DIM)).astype(np.float32))])
    publish_catalogue(tmp_path / "c", vectors, items_for(len(vectors)), categories=list(CATEGORIES), progress=False)
    catalogue = open_catalogue(tmp_path / "c")
    try:
        hits, extra = answer(catalogue, SearchRequest(k=4, vector=base), duplicates=True, duplicate_threshold=0.5)
        found = extra["duplicates"]
        assert len(found["listings"]) == MAX_DUPLICATES and found["more"] is True and len(hits.neighbours) == 4
        assert found["calibrated"] is False and found["threshold"] == 0.5 and found["precision"] is None
        distances = [n["distance"] for n in found["listings"]]
        assert distances == sorted(distances)
        _, few = answer(catalogue, SearchRequest(k=4, vector=base), duplicates=True, duplicate_threshold=1e-9)
        assert few["duplicates"]["listings"] == [] and few["duplicates"]["more"] is False
    finally:
        catalogue.close()


def test_without_a_calibrated_threshold_the_request_must_give_one(planted, tmp_path):
    publish_catalogue(tmp_path / "bare", planted["vectors"][:50], items_for(50), categories=list(CATEGORIES),
                      progress=False)
    catalogue = open_catalogue(tmp_path / "bare")
    try:
        manifest = catalogue.manifest
        for params in ({"duplicates": True}, {"diverse": True}):
            with pytest.raises(InputError) as info:
                plan_of({"k": 4, **params}, calibrated_threshold(manifest, "w" * 64), manifest)
            assert info.value.status == 409 and "no calibrated near-duplicate threshold" in info.value.reason
            assert "duplicate_threshold" in info.value.reason
        plan = plan_of({"k": 4, "duplicates": True, "duplicate_threshold": 0.2}, None, manifest)
        assert plan.threshold == Threshold(0.2, False) and plan.first_depth() == FIRST_DEPTH
        assert plan_of({"k": 4}, None, manifest).first_depth() == 4  # nothing asked: nothing needed
    finally:
        catalogue.close()
    other = {"duplicates": {"threshold": 0.1, "weights_sha256": "a" * 64}}
    assert calibrated_threshold(other, "b" * 64) is None  # calibrated for other weights: not used
    with pytest.raises(InputError, match="calibrated for other weights"):
        plan_of({"k": 4, "duplicates": True}, None, other)
    per_category = {"duplicates": {"threshold": None, "by_category": {"bags": 0.1}, "weights_sha256": "a" * 64}}
    assert calibrated_threshold(per_category, "a" * 64).of("bags") == 0.1
    with pytest.raises(InputError, match="calibrated for other weights"):
        plan_of({"k": 4, "duplicates": True}, calibrated_threshold(per_category, "b" * 64), per_category)
    failed = {"duplicates": {"threshold": None, "precision": 0.4, "target_precision": 0.99}}
    with pytest.raises(InputError, match=r"no threshold with precision 0.99 \(0.4 at best\)"):
        plan_of({"k": 4, "diverse": True}, None, failed)


def test_each_listing_is_judged_by_its_own_category_s_threshold(planted, tmp_path):
    by_category = {"bags": THRESHOLD, "phones": None, "shoes": 1e-9}  # phones: no threshold reaches the target
    publish_catalogue(tmp_path / "c", planted["vectors"], items_for(len(planted["vectors"])),
                      categories=list(CATEGORIES), progress=False,
                      duplicates={"threshold": THRESHOLD, "by_category": by_category, "weights_sha256": "w" * 64})
    catalogue = open_catalogue(tmp_path / "c")
    try:
        for group in planted["groups"]:
            base = planted["vectors"][group[0]]
            hits, extra = answer(catalogue, SearchRequest(k=4, vector=base), duplicates=True)
            expected = [key for key in group if CATEGORIES[key % 3] == "bags" or
                        (CATEGORIES[key % 3] == "shoes" and key == group[0])]
            found = extra["duplicates"]["listings"]
            assert sorted(int(n["id"][4:]) for n in found) == sorted(expected), group
            assert {n["category"]: n["threshold"] for n in found}.items() <= {"bags": THRESHOLD,
                                                                               "shoes": 1e-9}.items()
            # a vector's own category is unknown here: the answer names the catalogue-wide threshold
            assert extra["duplicates"]["per_category"] is True and extra["duplicates"]["threshold"] == THRESHOLD
            kept, _ = answer(catalogue, SearchRequest(k=4, vector=base), diverse=True)
            members = [int(n.id[4:]) for n in kept.neighbours if int(n.id[4:]) in group]
            # a bag within its threshold of the kept base is left out, whatever the base's category; the others stay
            assert sum(CATEGORIES[key % 3] == "bags" for key in members) == (CATEGORIES[group[0] % 3] == "bags")
            others = [key for key in group if CATEGORIES[key % 3] != "bags" or key == group[0]]
            assert len(members) == min(4, len(others))
        scan = scan_catalogue(catalogue, THRESHOLD, by_category=by_category, progress=False)
        assert all(CATEGORIES[key % 3] == "bags" for group in scan.groups for key, _ in group)
        assert [[key for key, _ in group] for group in scan.groups] == sorted(
            [[key for key in g if CATEGORIES[key % 3] == "bags"] for g in planted["groups"]
             if sum(CATEGORIES[key % 3] == "bags" for key in g) > 1], key=len, reverse=True)
    finally:
        catalogue.close()


def labelled(rows):
    """A LabelledSet of (distance, positive, category) rows, every copy a JPEG one."""
    distances, positive, categories = (np.array(column) for column in zip(*rows))
    return LabelledSet(distances.astype(float), positive.astype(bool), np.full(len(rows), "jpeg"),
                       np.where(positive.astype(bool), "copy", "nearest"), categories, listings=len(rows),
                       identical_left_out=0)


def test_thresholds_are_calibrated_per_category_of_the_listing_when_it_has_enough_copies():
    n = MIN_COPIES
    rows = [(0.001 * (i + 1) / n, True, "easy") for i in range(n)] + [(0.05 + i / 1e4, False, "easy") for i in range(n)]
    rows += [(0.002, True, "hard")] * 500 + [(0.0001, False, "hard")] * 5 + [(0.01, False, "hard")] * n
    rows += [(0.0005, True, "rare")] * 3 + [(0.3, False, "rare")] * 3
    copies = n + 500 + 3
    record = record_of(labelled(rows), "w" * 64)
    assert record["by_category"] == {"easy": 0.001, "hard": 0.002}  # "rare" has too few copies of its own
    assert record["categories"]["hard"] == {"copies": 500, "threshold": 0.002, "precision": round(500 / 505, 4),
                                            "recall": 1.0}
    assert record["categories"]["rare"] == {"copies": 3, "threshold": 0.0005, "precision": 1.0, "recall": 1.0}
    assert record["catalogue_wide"] == {"threshold": 0.002, "precision": round(copies / (copies + 5), 4),
                                        "recall": 1.0}
    assert (record["precision"], record["recall"]) == (round(copies / (copies + 5), 4), 1.0)
    assert record["alterations"]["jpeg"]["copies"] == copies and record["threshold"] == 0.002
    strict = record_of(labelled(rows), "w" * 64, target=0.999)
    assert strict["by_category"] == {"easy": 0.001, "hard": None}  # no threshold reaches 0.999 in "hard"
    assert strict["threshold"] == pytest.approx(0.001 * 4 / n)  # catalogue-wide: before the hard negatives
    assert (strict["precision"], strict["recall"]) == (1.0, round(n / copies, 4))  # rare copies lie beyond it


# ---------------------------------------------------------------------------------------------- the scan

def test_union_find_roots_each_group_at_its_first_key():
    sets = UnionFind()
    for a, b in ((5, 9), (9, 2), (7, 8), (8, 7), (3, 3)):
        sets.union(a, b)
    assert sorted(sets.groups().values()) == [[2, 5, 9], [7, 8]]
    assert sets.find(9) == 2


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_the_scan_finds_exactly_the_planted_groups(planted, kind):
    catalogue = open_catalogue(planted["folders"][kind])
    try:
        scan = scan_catalogue(catalogue, THRESHOLD, neighbours=8, nprobe=2 if kind == "ivf" else None,
                              batch_rows=64, progress=False)
    finally:
        catalogue.close()
    assert [[key for key, _ in group] for group in scan.groups] == sorted(planted["groups"], key=len, reverse=True)
    vectors = planted["vectors"]
    for group in scan.groups:
        first = group[0][0]
        assert group[0][1] == 0.0
        for key, distance in group:
            assert distance == pytest.approx(float(((vectors[key] - vectors[first]) ** 2).sum()), abs=1e-5)
    assert scan.items == len(vectors) and (scan.margin == 0.0) == (kind == "flat")


def test_the_scan_command_writes_the_groups_and_their_picture(planted, tmp_path):
    images = tmp_path / "images"
    for item in items_for(len(planted["vectors"])):
        (images / item.category).mkdir(parents=True, exist_ok=True)
        product_photo(item.category, seed=int(item.id[4:])).save(images / item.image)
    out = tmp_path / "scan"
    report = scan_main([str(planted["folders"]["ivf"]), "--out", str(out), "--images", str(images), "--groups", "3",
                        "--neighbours", "8"])
    rows = list(csv.DictReader(io.StringIO((out / "groups.csv").read_text())))
    assert list(rows[0]) == ["group", "id", "distance"]
    found = {}
    for row in rows:
        found.setdefault(int(row["group"]), []).append(row["id"])
    expected = sorted(planted["groups"], key=len, reverse=True)
    assert [found[g] for g in sorted(found)] == [[f"sku-{key:05d}" for key in group] for group in expected]
    assert all(float(row["distance"]) <= 2 * THRESHOLD for row in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == report and summary["threshold_from"] == "calibrated" and summary["groups"] == len(expected)
    with Image.open(out / "groups.png") as picture:
        assert picture.width > 400 and picture.height > 200
    with pytest.raises(SystemExit, match="exists"):
        scan_main([str(planted["folders"]["ivf"]), "--out", str(out)])  # written once


def test_the_scan_needs_a_threshold_when_the_catalogue_records_none(planted, tmp_path):
    publish_catalogue(tmp_path / "bare", planted["vectors"], items_for(len(planted["vectors"])),
                      categories=list(CATEGORIES), progress=False)
    with pytest.raises(SystemExit, match="no calibrated near-duplicate threshold: pass --threshold"):
        scan_main([str(tmp_path / "bare"), "--out", str(tmp_path / "s1")])
    report = scan_main([str(tmp_path / "bare"), "--out", str(tmp_path / "s2"), "--threshold", str(THRESHOLD)])
    assert report["groups"] == len(planted["groups"]) and report["threshold_from"] == "--threshold"
    assert not (tmp_path / "s2" / "groups.png").exists()  # no --images: no picture


# ---------------------------------------------------------------------------------------------- calibration

def test_the_operating_point_is_the_largest_threshold_with_the_target_precision():
    distances = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08])
    positive = np.array([True, True, True, False, True, True, False, False])
    thresholds, precision, recall = curve(distances, positive)
    assert precision.tolist() == pytest.approx([1, 1, 1, 0.75, 0.8, 5 / 6, 5 / 7, 5 / 8])
    assert recall.tolist() == pytest.approx([0.2, 0.4, 0.6, 0.6, 0.8, 1, 1, 1])
    assert operating_point(distances, positive, 0.99) == pytest.approx((0.03, 1.0, 0.6))
    assert operating_point(distances, positive, 0.8) == pytest.approx((0.06, 5 / 6, 1.0))
    threshold, best, recall = operating_point(distances, ~positive, 0.99)
    assert threshold is None and recall == 0.0 and best < 0.99
    ties = curve(np.array([0.1, 0.1, 0.2]), np.array([True, False, True]))
    assert ties[0].tolist() == [0.1, 0.2] and ties[1].tolist() == pytest.approx([0.5, 2 / 3])


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_every_alteration_is_an_upload_the_service_decodes(mode):
    image = product_photo("shoes", seed=4, size=(60, 40)).convert(mode)
    copies = altered_copies(image, np.random.default_rng(0))
    assert [name for name, _, _ in copies] == list(ALTERATIONS)
    original = np.asarray(decode_image(_png(image)), dtype=np.float32)
    for name, data, parameter in copies:
        decoded = decode_image(data)
        assert decoded.mode == "RGB" and parameter, name
        if name in ("resize", "crop", "repost"):
            assert decoded.size != image.size, name
        else:
            assert decoded.size == image.size and not np.array_equal(np.asarray(decoded), original), name
    assert data[:2] == b"\xff\xd8"  # the re-post is a JPEG


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_updates_keep_the_calibration_and_a_bundle_of_other_weights_is_refused(planted, tmp_path):
    from tests.harness import calibrated_model  # noqa: PLC0415

    source = planted["folders"]["flat"]
    update_catalogue(source, tmp_path / "v2", remove_ids=["sku-00001"], progress=False)
    catalogue = open_catalogue(tmp_path / "v2")
    try:
        assert catalogue.manifest["duplicates"] == open_catalogue(source).manifest["duplicates"]
    finally:
        catalogue.close()
    preprocess = PreprocessSettings(image_size=32)
    model = calibrated_model(preprocess, [_png(product_photo("bags", seed=s)) for s in range(4)])
    with pytest.raises(BundleError, match="calibrated for weights wwwwwwwwwwww..., not these"):
        write_bundle(tmp_path / "bundle", model=model, categories=CATEGORIES, preprocess=preprocess,
                     catalogue_dir=tmp_path / "v2", normalize=True)
