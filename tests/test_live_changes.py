"""Listings in and out within seconds, through a real TorchServe, a real change log and the real write API: an added
listing is answered by photo and by id, a removed one never again, by any registered version, nor is its image
served by the page; folding the log into the next version under load changes no answer and fails no request."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import requests

from loadtests.steady_load import SteadyLoad
from serving.listings import ListingWriter
from serving.manage import main as manage
from serving.torchserve import ROOT, free_port
from serving.version_record import changes_path, read_record
from tests.fixtures import CATEGORIES, encode, product_photo, running_torchserve
from tests.test_web import running_front
from training.next_version import main as next_version

MODEL = "live-search"
VISIBLE_WITHIN = 30  # seconds a test waits for a change to show; the benchmark measures how long it takes


@pytest.fixture(scope="module")
def line(bundle_dir, photo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    store, images = root / "store", root / "images"
    shutil.copytree(photo_dir, images)
    next_version(["--name", MODEL, "--model-store", str(store), "--bundle", str(bundle_dir), "--data-dir",
                  str(images), "--batch-size", "4", "--max-batch-delay", "20"])
    with running_torchserve(root / "ts", store, [f"{MODEL}={MODEL}-v1.mar"]) as server:
        writer = ListingWriter(bundle_dir, changes_path(store, MODEL), MODEL, images)
        yield {"root": root, "store": store, "images": images, "server": server, "writer": writer,
               "bundle": bundle_dir}
        writer.close()


def search(server, photo=None, version=None, **fields):
    url = f"{server.urls['inference']}/predictions/{MODEL}" + (f"/{version}" if version else "")
    if photo is not None:
        return requests.post(url, data=photo, headers={**server.headers(), "Content-Type": "image/jpeg",
                                                       **{f"X-{k.title()}": str(v) for k, v in fields.items()}},
                             timeout=60)
    return requests.post(url, json=fields, headers=server.headers(), timeout=60)


def wait_until(check, what):
    deadline = time.time() + VISIBLE_WITHIN
    while time.time() < deadline:
        if check():
            return time.time()
        time.sleep(0.1)
    raise AssertionError(f"not within {VISIBLE_WITHIN} s: {what}")


def everything(line):
    """A k that reaches every listing: the catalogue's count at load bounds k (max_k)."""
    return line["writer"].bundle.catalogue.count


def ids(response):
    assert response.status_code == 200, response.text
    return [n["id"] for n in response.json()["neighbours"]]


def test_an_added_listing_is_answered_by_photo_and_by_id_without_a_new_version(line):
    server, writer = line["server"], line["writer"]
    photo = encode(product_photo("bags", 7001, size=(80, 60)), "JPEG")
    change = writer.add("added-bag", "bags", photo)
    assert change["image"] == "bags/added-bag.jpg" and (line["images"] / change["image"]).read_bytes() == photo
    wait_until(lambda: "added-bag" in ids(search(server, photo, top_k=everything(line))), "the added listing answers")
    nearest = search(server, photo, top_k=3).json()["neighbours"]
    assert nearest[0]["id"] == "added-bag" and nearest[0]["distance"] == 0.0, nearest  # its own photo
    by_id = search(server, listing="added-bag", k=3)
    assert by_id.status_code == 200 and by_id.json()["listing"]["id"] == "added-bag", by_id.text
    filtered = search(server, photo, top_k=everything(line), category="shoes")
    assert "added-bag" not in ids(filtered)  # the overlay obeys filters too
    with pytest.raises(Exception, match="already in the catalogue"):
        writer.add("added-bag", "bags", photo)
    assert [v["version"] for v in read_record(line["store"], MODEL)["versions"]] == ["1.0"]  # no version minted


def test_a_removed_listing_is_never_answered_again_by_any_version(line):
    server, writer = line["server"], line["writer"]
    k = everything(line)
    photo = encode(product_photo("shoes", 7002, size=(80, 60)), "JPEG")
    target = ids(search(server, photo, top_k=3))[0]
    # a second version, which folds the log so far, registered beside v1
    next_version(["--name", MODEL, "--model-store", str(line["store"]), "--compact"])
    manage(["--state-dir", str(server.state_dir), "register", f"{MODEL}-v2.mar", "--workers", "1"])
    assert target in ids(search(server, photo, version="2.0", top_k=3))
    writer.remove(target)
    for version in ("1.0", "2.0"):
        wait_until(lambda version=version: target not in ids(search(server, photo, version=version, top_k=k)),
                   f"{target} gone from {version}")
        gone = search(server, version=version, listing=target, k=2)
        assert gone.status_code == 404 and "unknown listing" in gone.json()["error"], gone.text
    manage(["--state-dir", str(server.state_dir), "set-default", MODEL, "2.0"])
    manage(["--state-dir", str(server.state_dir), "rollback", MODEL])  # back to 1.0: the removal holds
    assert target not in ids(search(server, photo, top_k=k))
    description = requests.get(f"{server.urls['management']}/models/{MODEL}/1.0?customized=true",
                               headers=server.headers("management"), timeout=60).json()[0]["customizedMetadata"]
    changes = (json.loads(description) if isinstance(description, str) else description)["changes"]
    assert changes["removed"] >= 1 and changes["applied"] >= 2


def test_the_page_no_longer_serves_a_removed_listing_s_image(line, tmp_path):
    server, writer = line["server"], line["writer"]
    photo = encode(product_photo("phones", 7003, size=(80, 60)), "JPEG")
    writer.add("page-phone", "phones", photo)
    wait_until(lambda: "page-phone" in ids(search(server, photo, top_k=everything(line))), "the new phone answers")
    with running_front(line["images"], server.state_dir, MODEL) as front:
        answer = httpx.post(f"{front}/api/search", files={"image": ("p.jpg", photo, "image/jpeg")},
                            data={"k": str(min(everything(line), 100))}, timeout=60).json()
        image = next(n["image_url"] for n in answer["neighbours"] if n["id"] == "page-phone")
        assert httpx.get(f"{front}{image}", timeout=30).status_code == 200
        writer.remove("page-phone")
        gone = httpx.get(f"{front}{image}", timeout=30)
        assert gone.status_code == 404 and gone.json()["error"], gone.text


def test_folding_the_log_under_load_changes_no_answer_and_fails_no_request(line):
    server, writer = line["server"], line["writer"]
    for i, category in enumerate(CATEGORIES):
        writer.add(f"fold-{category}", category, encode(product_photo(category, 7100 + i, size=(80, 60)), "JPEG"))
    writer.remove("fold-phones")
    queries = [encode(product_photo(c, 7200 + i, size=(80, 60)), "JPEG") for i, c in enumerate(CATEGORIES * 2)]
    wait_until(lambda: "fold-bags" in ids(search(server, queries[0], top_k=everything(line))), "the adds answer")
    before = [ids(search(server, q, top_k=everything(line))) for q in queries]
    load = SteadyLoad(f"{server.urls['inference']}/predictions/{MODEL}", server.headers(), queries[0], clients=2,
                      max_seconds=300).start()
    try:
        next_version(["--name", MODEL, "--model-store", str(line["store"]), "--compact"])
        manage(["--state-dir", str(server.state_dir), "register", f"{MODEL}-v3.mar", "--workers", "1",
                "--set-default"])
        assert load.wait_for("3.0"), load.summary()
    finally:
        load.stop()
    assert not load.failures(), load.failures()[:3]
    after = [ids(search(server, q, top_k=everything(line))) for q in queries]
    assert after == before
    entry = read_record(line["store"], MODEL)["versions"][-1]
    folded = json.loads((Path(entry["catalogue_dir"]) / "catalogue.json").read_text())
    assert entry["version"] == "3.0" and folded["changes_folded"] == writer.log.last_seq()


@pytest.fixture(scope="module")
def api(line, tmp_path_factory):
    port = free_port()
    key_file = tmp_path_factory.mktemp("api") / "key.json"
    process = subprocess.Popen([sys.executable, "-m", "serving.listings", "--name", MODEL, "--model-store",
                                str(line["store"]), "--images", str(line["images"]), "api", "--port", str(port),
                                "--key-file", str(key_file)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                httpx.get(f"{url}/status", timeout=2)
                break
            except httpx.HTTPError:
                assert process.poll() is None, process.stdout.read()
                time.sleep(0.5)
        yield url, {"Authorization": f"Bearer {json.loads(key_file.read_text())['key']}"}
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_write_api_adds_and_removes_with_its_key_only(line, api):
    url, auth = api
    server = line["server"]
    photo = encode(product_photo("shoes", 7300, size=(80, 60)), "JPEG")
    assert httpx.post(f"{url}/listings", data={"id": "x", "category": "shoes"}, timeout=30).status_code == 401
    cross_site = httpx.delete(f"{url}/listings/x", headers={**auth, "Origin": "http://evil.test"}, timeout=30)
    assert cross_site.status_code == 403 and cross_site.json()["error"]
    added = httpx.post(f"{url}/listings", data={"id": "api-shoe", "category": "shoes"}, timeout=120,
                       files={"image": ("s.jpg", photo, "image/jpeg")}, headers=auth)
    assert added.status_code == 201 and added.json()["seq"] > 0, added.text
    wait_until(lambda: "api-shoe" in ids(search(server, photo, top_k=everything(line))), "the API's listing answers")
    for bad, status in (({"id": "api-shoe", "category": "shoes"}, 409), ({"id": "y", "category": "hats"}, 400),
                        ({"id": "a\x01b", "category": "shoes"}, 400)):
        refused = httpx.post(f"{url}/listings", data=bad, files={"image": ("s.jpg", photo, "image/jpeg")},
                             headers=auth, timeout=120)
        assert refused.status_code == status and refused.json()["error"], (bad, refused.text)
    not_image = httpx.post(f"{url}/listings", data={"id": "z", "category": "shoes"}, headers=auth, timeout=120,
                           files={"image": ("s.jpg", b"not a photo", "image/jpeg")})
    assert not_image.status_code == 400 and "image" in not_image.json()["error"]
    assert httpx.get(f"{url}/listings/api-shoe", headers=auth, timeout=30).json()["state"] == "live"
    removed = httpx.delete(f"{url}/listings/api-shoe", headers=auth, timeout=30)
    assert removed.status_code == 200, removed.text
    assert httpx.delete(f"{url}/listings/api-shoe", headers=auth, timeout=30).status_code == 404
    wait_until(lambda: "api-shoe" not in ids(search(server, photo, top_k=everything(line))),
               "the API's removal holds")
