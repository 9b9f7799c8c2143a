"""The same queries to the FAISS exact catalogue and to a FLAT Milvus collection of the same items, through one real
TorchServe (2 workers each, the Milvus ones sharing one Milvus Lite server): plain, filtered, excluded, by listing,
after an add and after a delete. The ids, categories and images are equal, the distances equal within float
tolerance, and the refusals are the same JSON."""
import time

import pytest
import requests

from tests.conftest import FAISS_MODEL, MILVUS_MODEL
from tests.fixtures import CATEGORIES, encode, product_photo

DISTANCE_TOLERANCE = 1e-4  # squared L2 of unit vectors, float32 on both sides
PER_CATEGORY = 8  # tests.fixtures.write_photo_folder
ITEMS = PER_CATEGORY * len(CATEGORIES)
VISIBLE_WITHIN = 30  # s a change may take to reach the FAISS workers (they follow the change log per batch)


def ask(server, model, photo=None, **fields):
    url = f"{server.urls['inference']}/predictions/{model}"
    if photo is not None:
        headers = {"Content-Type": "image/jpeg", **{f"X-{k.replace('_', '-').title()}": str(v)
                                                     for k, v in fields.items()}}
        return requests.post(url, data=photo, headers={**server.headers(), **headers}, timeout=60)
    return requests.post(url, json=fields, headers=server.headers(), timeout=60)


def both(pair, photo=None, **fields):
    """(FAISS answer, Milvus answer) to the same request."""
    return tuple(ask(pair["server"], model, photo, **fields) for model in (FAISS_MODEL, MILVUS_MODEL))


def assert_congruent(faiss_answer, milvus_answer):
    assert faiss_answer.status_code == milvus_answer.status_code, (faiss_answer.text, milvus_answer.text)
    a, b = faiss_answer.json(), milvus_answer.json()
    if faiss_answer.status_code != 200:
        assert a == b
        return a
    for answer in (a, b):
        answer.pop("model")
    neighbours_a, neighbours_b = a.pop("neighbours"), b.pop("neighbours")
    assert a == b
    assert [(n["id"], n["category"], n["image"]) for n in neighbours_a] == \
           [(n["id"], n["category"], n["image"]) for n in neighbours_b]
    for n, m in zip(neighbours_a, neighbours_b):
        assert n["distance"] == pytest.approx(m["distance"], abs=DISTANCE_TOLERANCE)
    return {**a, "neighbours": neighbours_a}


def photos():
    return [encode(product_photo(category, 9000 + i, size=(80, 60)), "JPEG") for i, category in
            enumerate(CATEGORIES * 2)]


def test_plain_queries_answer_the_same_neighbours(milvus_pair):
    for photo in photos():
        for k in (1, 5, ITEMS):
            answer = assert_congruent(*both(milvus_pair, photo, top_k=k))
            assert len(answer["neighbours"]) == k
    too_many = assert_congruent(*both(milvus_pair, photos()[0], top_k=ITEMS + 1))  # max_k: the published count
    assert too_many["status"] == 400 and "k must be between" in too_many["error"]


def test_filtered_queries_answer_exactly_k_of_the_chosen_categories(milvus_pair):
    for photo in photos()[:3]:
        for categories in (CATEGORIES[1], f"{CATEGORIES[0]},{CATEGORIES[2]}"):
            for k in (3, 8, 20):
                answer = assert_congruent(*both(milvus_pair, photo, top_k=k, category=categories))
                chosen = set(categories.split(","))
                assert {n["category"] for n in answer["neighbours"]} <= chosen
                assert len(answer["neighbours"]) == min(k, PER_CATEGORY * len(chosen))
    unknown = assert_congruent(*both(milvus_pair, photos()[0], category="hats"))
    assert unknown["status"] == 400 and "unknown category" in unknown["error"]


def test_excluded_ids_are_left_out_alike(milvus_pair):
    photo = photos()[1]
    first = assert_congruent(*both(milvus_pair, photo, top_k=4))
    left_out = [n["id"] for n in first["neighbours"][:2]]
    answer = assert_congruent(*both(milvus_pair, photo, top_k=4, exclude=",".join(left_out)))
    assert not set(left_out) & {n["id"] for n in answer["neighbours"]}
    category = CATEGORIES[0]
    everything = assert_congruent(*both(milvus_pair, photo, top_k=8, category=category))
    nothing_left = assert_congruent(*both(milvus_pair, photo, top_k=8, category=category,
                                          exclude=",".join(n["id"] for n in everything["neighbours"])))
    assert nothing_left["status"] == 400 and "no item matches" in nothing_left["error"]


def test_search_by_listing_answers_alike(milvus_pair):
    photo = photos()[2]
    listings = [n["id"] for n in assert_congruent(*both(milvus_pair, photo, top_k=3))["neighbours"]]
    for listing in listings:
        answer = assert_congruent(*both(milvus_pair, listing=listing, k=5))
        assert answer["listing"]["id"] == listing and listing not in {n["id"] for n in answer["neighbours"]}
        filtered = assert_congruent(*both(milvus_pair, listing=listing, k=5, category=CATEGORIES[2]))
        assert {n["category"] for n in filtered["neighbours"]} == {CATEGORIES[2]}
    unknown = assert_congruent(*both(milvus_pair, listing="no-such-listing", k=2))
    assert unknown["status"] == 404


def wait_congruent(pair, what, photo=None, **fields):
    """The congruent answer once both engines show a change (the FAISS workers see it at their next batch)."""
    deadline = time.time() + VISIBLE_WITHIN
    while True:
        try:
            return assert_congruent(*both(pair, photo, **fields))
        except AssertionError:
            if time.time() > deadline:
                raise AssertionError(f"not congruent within {VISIBLE_WITHIN} s: {what}") from None
            time.sleep(0.2)


def test_after_an_add_and_a_delete_both_engines_answer_alike(milvus_pair):
    photo = encode(product_photo("shoes", 9100, size=(80, 60)), "JPEG")
    for writer in milvus_pair["writers"].values():
        writer.add("congruent-shoe", "shoes", photo, image="shoes/congruent-shoe.jpg")
    added = wait_congruent(milvus_pair, "the added listing", photo, top_k=3)
    assert added["neighbours"][0]["id"] == "congruent-shoe" and added["neighbours"][0]["distance"] == 0.0
    target = [n["id"] for n in assert_congruent(*both(milvus_pair, photo, top_k=3, category="shoes"))["neighbours"]][1]
    for writer in milvus_pair["writers"].values():
        writer.remove(target)
        writer.remove("congruent-shoe")
    after = wait_congruent(milvus_pair, "the deletes", photo, top_k=ITEMS - 1)  # every live one: one added, two removed
    assert not {target, "congruent-shoe"} & {n["id"] for n in after["neighbours"]}
    assert len(after["neighbours"]) == ITEMS - 1
    gone = assert_congruent(*both(milvus_pair, listing=target, k=2))
    assert gone["status"] == 404
    filtered = assert_congruent(*both(milvus_pair, photo, top_k=8, category="shoes"))
    assert len(filtered["neighbours"]) == PER_CATEGORY - 1  # less the removed one
