"""The web front (web/) over real HTTP: a real uvicorn server forwarding to the session's real TorchServe.

Covered here: the page and its local assets, searches by photo and by listing, the category filter, the
versions list, catalogue images from the catalogue folder only, the upload bound, TorchServe's reasons passed on,
a rotated inference key read again from the key file (and none renewed by the front), and no management call
reachable through the front. tests/test_web_access.py covers what the front offers and to whom.
"""
import http.client
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import requests
from PIL import Image

from serving.build_archive import main as build_archive
from serving.management_client import ManagementClient
from serving.torchserve import ROOT, free_port
from tests.conftest import MODEL_NAME
from tests.fixtures import CATEGORIES, encode, product_photo
from web.app import DEFAULT_MAX_UPLOAD, FORM_ALLOWANCE

SECRET = b"outside the catalogue"


def held_out_photo(category="shoes", seed=4242, fmt="PNG"):
    """A photo that is not in the catalogue (the catalogue's seeds are 0..207)."""
    return encode(product_photo(category, seed), fmt)


@contextmanager
def running_front(images, state_dir, model=MODEL_NAME, extra=()):
    """`python -m web` as a real uvicorn server on a free loopback port; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "web", "--images", str(images), "--state-dir", str(state_dir),
               "--model", model, "--port", str(port), *extra]
    log = tempfile.TemporaryFile()  # a file, not a pipe: nobody reads the access log while tests run
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise AssertionError(f"the front exited: {log.read().decode(errors='replace')}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the front did not answer within 60 s"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


INSIDE_LINK, OUTSIDE_LINK = "bags/bags-00.png", "phones/phones-05.jpg"  # catalogue items whose files are links


@pytest.fixture(scope="module")
def catalogue(photo_dir, tmp_path_factory):
    """A copy of the session's photo folder, with an image outside it and links that lead out, and two of the
    catalogue's own files replaced by links: one to a file inside the folder, one leading out."""
    root = tmp_path_factory.mktemp("web")
    images, outside = root / "catalogue", root / "outside"
    shutil.copytree(photo_dir, images)
    outside.mkdir()
    (outside / "secret.png").write_bytes(encode(product_photo("bags", 1)) + SECRET)
    (images / "originals").mkdir()
    (images / INSIDE_LINK).rename(images / "originals" / "bags-00.png")
    (images / INSIDE_LINK).symlink_to(images / "originals" / "bags-00.png")
    (images / OUTSIDE_LINK).unlink()
    (images / OUTSIDE_LINK).symlink_to(outside / "secret.png")
    (images / "bags" / "escape.png").symlink_to(outside / "secret.png")  # a file link leading out
    (images / "linked").symlink_to(outside, target_is_directory=True)  # a folder link leading out
    (images / "bags" / "alias.png").symlink_to(images / "bags" / "bags-00.png")  # a link that stays inside
    (images / "bags" / "notes.txt").write_text("not an image")
    (images / ".hidden.png").write_bytes(encode(product_photo("bags", 2)))
    return images


@pytest.fixture(scope="module")
def front(torchserve, catalogue):
    with running_front(catalogue, torchserve.state_dir) as url:
        yield url


def search(front, photo=None, timeout=120, **fields):
    files = {"image": ("photo.png", photo, "image/png")} if photo is not None else None
    return httpx.post(f"{front}/api/search", files=files, data=fields, timeout=timeout)


def raw_get(url, path):
    """GET with the path sent exactly as written (no client-side normalisation of `..`)."""
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def keys_of(server):
    return json.loads(server.key_file.read_text())


# -- the page -------------------------------------------------------------------------------------------------------

def test_page_and_its_assets_are_served_locally(front, torchserve):
    page = httpx.get(front)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(assets) == ["/static/app.js", "/static/style.css"]
    texts = [page.text]
    for asset in assets:
        response = httpx.get(front + asset)
        assert response.status_code == 200, asset
        texts.append(response.text)
    for text in texts:  # no CDN, no remote font or script: everything comes from this server
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), text[:200]
    for key in (k["key"] for k in keys_of(torchserve).values()):
        assert all(key not in text for text in texts)


def test_versions_are_listed_default_first_with_their_categories(front, manifest, torchserve):
    response = httpx.get(f"{front}/api/versions")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == MODEL_NAME
    assert [(v["version"], v["default"]) for v in answer["versions"]] == [("1.0", True)]
    version = answer["versions"][0]
    assert version["categories"] == manifest["categories"] and version["items"] == manifest["catalogue"]["count"]
    assert version["default_k"] == 4 and version["max_k"] == manifest["catalogue"]["count"]  # max_k 100 > 24 items
    assert all(key["key"] not in response.text for key in keys_of(torchserve).values())


def test_search_by_photo_is_forwarded_and_its_images_load(front, manifest):
    response = search(front, held_out_photo(), k="5")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == MODEL_NAME and answer["model_version"] == "1.0"
    assert answer["category"] in CATEGORIES and 0 < answer["confidence"] <= 1
    assert answer["k"] == 5 and len(answer["neighbours"]) == 5
    for neighbour in answer["neighbours"]:
        assert neighbour["image_url"] == f"/images/{neighbour['image']}"
        image = httpx.get(front + neighbour["image_url"])
        if neighbour["image"] == OUTSIDE_LINK:  # its file is a link that leads out of the folder
            assert image.status_code == 404
            continue
        assert image.status_code == 200 and image.headers["content-type"].startswith("image/")
        assert Image.open(io.BytesIO(image.content)).size == (64, 48)


def test_the_default_version_is_searched_by_its_name_too(front):
    assert search(front, held_out_photo(), k="1").json()["model_version"] == "1.0"  # the default, by no version
    response = search(front, held_out_photo(), version="1.0", k="2")
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "1.0" and len(response.json()["neighbours"]) == 2
    unknown = search(front, held_out_photo(), version="9.9")
    assert unknown.status_code == 404
    assert unknown.json()["error"] == (f"version '9.9' of {MODEL_NAME} is not offered here; search the default "
                                       f"(no version)")
    sneaky = search(front, held_out_photo(), version="1.0/../../ping")
    assert sneaky.status_code == 404 and "is not offered here" in sneaky.json()["error"]


# -- catalogue images: the catalogue folder only ----------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/images/../outside/secret.png",
    "/images/bags/../../outside/secret.png",
    "/images/%2e%2e/outside/secret.png",
    "/images/..%2Foutside%2Fsecret.png",
    "/images/bags%2F..%2F..%2Foutside%2Fsecret.png",
    "/images/..%5Coutside%5Csecret.png",
    "/images//{outside}/secret.png",
    "/images/%2F{outside}%2Fsecret.png",
    "/images/bags/escape.png",       # a symlink whose target is outside
    "/images/bags/alias.png",        # a link inside the folder, but no answer names it
    "/images/linked/secret.png",     # a folder symlink leading outside
    "/images/bags/notes.txt",        # inside, but not an image
    "/images/bags/missing.png",
    "/images/.hidden.png",
    "/images/",
])
def test_images_outside_the_catalogue_folder_get_404(front, catalogue, path):
    status, body = raw_get(front, path.format(outside=(catalogue.parent / "outside").as_posix().lstrip("/")))
    assert status == 404, (path, status)
    assert SECRET not in body and json.loads(body)["error"] == "not a catalogue image"


def test_answered_images_are_served_from_the_folder_and_links_that_lead_out_are_not(front, catalogue):
    for listing, reference in (("bags-00", INSIDE_LINK), ("shoes-01", "shoes/shoes-01.jpg"),
                               ("phones-05", OUTSIDE_LINK)):
        answer = search(front, None, listing=listing, k="1").json()
        assert answer["listing"]["image_url"] == f"/images/{reference}"
    for reference in (INSIDE_LINK, "shoes/shoes-01.jpg"):
        status, body = raw_get(front, f"/images/{reference}")
        assert status == 200, reference
        assert body == (catalogue / reference).read_bytes() and SECRET not in body
    status, body = raw_get(front, f"/images/{OUTSIDE_LINK}")  # named in an answer, but its file leads out
    assert status == 404 and SECRET not in body and json.loads(body)["error"] == "not a catalogue image"


# -- uploads: the size bound and TorchServe's reasons ----------------------------------------------------------------

def test_uploads_over_the_bound_get_413_with_a_reason(front):
    noise = np.random.default_rng(0).integers(0, 256, DEFAULT_MAX_UPLOAD + FORM_ALLOWANCE, dtype=np.uint8).tobytes()
    just_over = search(front, noise[:DEFAULT_MAX_UPLOAD + 1])  # the photo's own bound, to the byte
    assert just_over.status_code == 413
    assert just_over.json() == {"status": 413, "error": f"upload too large: the photo is {DEFAULT_MAX_UPLOAD + 1} "
                                                        f"bytes, over the limit of {DEFAULT_MAX_UPLOAD} bytes (6.0 MB)"}
    too_big = noise + b"x"
    declared = search(front, too_big)  # Content-Length says so: refused before the body is read
    assert declared.status_code == 413
    assert declared.json()["status"] == 413 and "upload too large: the request is" in declared.json()["error"]
    assert str(DEFAULT_MAX_UPLOAD + FORM_ALLOWANCE) in declared.json()["error"]

    def chunks():  # no Content-Length: refused once the streamed body passes the bound
        for start in range(0, len(too_big), 1 << 20):
            yield too_big[start:start + (1 << 20)]

    boundary = "web-test-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            f'Content-Type: image/png\r\n\r\n').encode()
    streamed = httpx.post(f"{front}/api/search", content=iter([head, *chunks(), f"\r\n--{boundary}--\r\n".encode()]),
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=60)
    assert streamed.status_code == 413 and "upload too large: the request is over" in streamed.json()["error"]


def test_a_large_photo_under_the_bound_is_searched(front):
    noise = np.random.default_rng(1).integers(0, 256, size=(1300, 1400, 3), dtype=np.uint8)
    photo = encode(Image.fromarray(noise), "PNG")
    assert 5_000_000 < len(photo) < DEFAULT_MAX_UPLOAD
    response = search(front, photo, k="3")
    assert response.status_code == 200, response.text
    assert len(response.json()["neighbours"]) == 3


def test_invalid_uploads_get_torchserves_reason_and_the_front_keeps_working(front):
    text = search(front, b"this is a text file, not a photo\n")
    assert text.status_code == 400
    assert text.json() == {"error": "not an image: the body is in no format we can decode", "status": 400}
    empty = search(front, b"")
    assert empty.status_code == 400 and empty.json()["error"] == "empty body: send the image bytes"
    truncated = search(front, held_out_photo(fmt="JPEG")[:300])
    assert truncated.status_code == 400 and truncated.json()["error"].startswith("corrupt or truncated image")
    bad_k = search(front, held_out_photo(), k="0")
    assert bad_k.status_code == 400 and bad_k.json()["error"] == "k must be between 1 and 24, not 0"
    # the front's own checks
    nothing = search(front, None, k="3")
    assert nothing.status_code == 400 and "choose a photo" in nothing.json()["error"]
    both = search(front, held_out_photo(), listing="bags-01")
    assert both.status_code == 400 and "not both" in both.json()["error"]
    unknown_field = search(front, held_out_photo(), token="x")
    assert unknown_field.status_code == 400 and "unknown field(s) token" in unknown_field.json()["error"]
    raw = httpx.post(f"{front}/api/search", content=held_out_photo(), headers={"Content-Type": "image/png"})
    assert raw.status_code == 415 and "multipart/form-data" in raw.json()["error"]
    assert search(front, held_out_photo()).status_code == 200


# -- the inference key stays here and is renewed ----------------------------------------------------------------------

def rotate_inference_key(server):
    """What an operator (or TorchServe's expiry plus any renewal) does: a new key; the old one is refused."""
    before = keys_of(server)["inference"]["key"]
    response = requests.get(f"{server.urls['management']}/token", params={"type": "inference"},
                            headers={"Authorization": f"Bearer {keys_of(server)['API']['key']}"}, timeout=30)
    assert response.status_code == 200, response.text
    after = keys_of(server)["inference"]["key"]
    assert after != before
    refused = requests.post(f"{server.urls['inference']}/predictions/{MODEL_NAME}", data=held_out_photo(),
                            headers={"Authorization": f"Bearer {before}"}, timeout=60)
    assert refused.status_code == 400 and "Token" in refused.text  # TorchServe no longer takes the old key
    return before, after


def test_a_rotated_key_is_picked_up_and_the_next_search_succeeds(front, torchserve):
    assert search(front, held_out_photo()).status_code == 200  # the front holds the current key
    _, rotated = rotate_inference_key(torchserve)
    response = search(front, held_out_photo(), k="2")
    assert response.status_code == 200, response.text
    assert keys_of(torchserve)["inference"]["key"] == rotated  # read again from the key file, not renewed


def test_a_refused_key_that_nobody_renewed_gets_502_and_the_front_renews_none(front, torchserve):
    assert search(front, held_out_photo()).status_code == 200
    held, current = rotate_inference_key(torchserve)  # the front still holds `held`, now refused
    # An expired key that nobody renewed: the key file still holds the refused key.
    data = keys_of(torchserve)
    data["inference"]["key"] = held
    torchserve.key_file.write_text(json.dumps(data))
    try:
        response = search(front, held_out_photo(), k="2")
        assert keys_of(torchserve) == data  # the front asked for no new key: the file is as written
    finally:  # never leave a refused key behind for the other tests
        data["inference"]["key"] = current
        torchserve.key_file.write_text(json.dumps(data))
    assert response.status_code == 502, response.text
    assert response.json()["error"].startswith(f"TorchServe refused the inference key in {torchserve.key_file} and "
                                               f"the file holds no newer one")
    assert "whoever runs TorchServe renews it" in response.json()["error"]
    renewed = search(front, held_out_photo(), k="2")  # the operator's renewed key, read from the file
    assert renewed.status_code == 200, renewed.text


def test_no_management_call_is_reachable_through_the_front(front, torchserve):
    probes = [("GET", "/models"), ("GET", f"/models/{MODEL_NAME}"), ("GET", "/token?type=inference"),
              ("POST", "/models?url=x.mar"), ("PUT", f"/models/{MODEL_NAME}/1.0/set-default"),
              ("DELETE", f"/models/{MODEL_NAME}/1.0"), ("GET", f"/api/models/{MODEL_NAME}"),
              ("POST", "/api/versions"), ("PUT", "/api/versions"), ("DELETE", "/api/versions"),
              ("GET", "/api/search"), ("POST", f"/predictions/{MODEL_NAME}"), ("GET", "/docs"),
              ("GET", "/openapi.json")]
    for method, path in probes:
        response = httpx.request(method, front + path)
        assert response.status_code in (404, 405), (method, path, response.status_code)
        assert "error" in response.json()
    keys = [k["key"] for k in keys_of(torchserve).values()]
    for path in ("/", "/api/config", "/api/versions", "/static/app.js"):
        assert not any(key in httpx.get(front + path).text for key in keys)


# -- search by listing and the category filter (the contract's `listing` and `category`) ----------------------------

def test_search_by_listing_leaves_the_listing_out(front):
    response = search(front, None, listing="bags-03", k="3")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["listing"]["id"] == "bags-03" and answer["listing"]["category"] == "bags"
    assert answer["listing"]["image_url"] == "/images/bags/bags-03.jpg"
    assert answer["category"] == "bags" and answer["confidence"] is None
    assert len(answer["neighbours"]) == 3 and "bags-03" not in [n["id"] for n in answer["neighbours"]]
    unknown = search(front, None, listing="no-such-item")
    assert unknown.status_code == 404 and unknown.json()["error"]


def test_category_filter_keeps_only_those_categories(front):
    one = search(front, held_out_photo(), k="5", category="phones")
    assert one.status_code == 200, one.text
    assert [n["category"] for n in one.json()["neighbours"]] == ["phones"] * 5
    files = [("image", ("photo.png", held_out_photo(), "image/png")), ("category", (None, "bags")),
             ("category", (None, "shoes")), ("k", (None, "10"))]
    several = httpx.post(f"{front}/api/search", files=files, timeout=120)
    assert several.status_code == 200, several.text
    assert len(several.json()["neighbours"]) == 10
    assert {n["category"] for n in several.json()["neighbours"]} <= {"bags", "shoes"}
    by_listing = search(front, None, listing="bags-03", k="4", category="shoes")
    assert by_listing.status_code == 200, by_listing.text
    assert [n["category"] for n in by_listing.json()["neighbours"]] == ["shoes"] * 4
    nothing = search(front, held_out_photo(), category="no-such-category")
    assert nothing.status_code == 400 and nothing.json()["error"]


# -- a second version, the default moving on, and the front as `make serve` runs it ------------------------------------

def test_another_version_is_offered_only_when_the_operator_allows_it(front, torchserve, catalogue, bundle_dir,
                                                                   model_store, manifest):
    archive = "tiny-search-web-v2"
    build_archive(["--bundle", str(bundle_dir), "--name", MODEL_NAME, "--version", "2.0", "--out-name", archive,
                   "--model-store", str(model_store), "--batch-size", "1", "--startup-timeout", "120",
                   "--max-k", "7"])
    client = ManagementClient.from_state(torchserve.state_dir, timeout=120)
    try:
        client.register(f"{archive}.mar", workers=1)
        assert sorted(v["modelVersion"] for v in client.versions(MODEL_NAME)) == ["1.0", "2.0"]
        # Registered, but not allowed: neither listed nor searched.
        versions = httpx.get(f"{front}/api/versions").json()["versions"]
        assert [(v["version"], v["default"]) for v in versions] == [("1.0", True)]
        refused = search(front, held_out_photo(), version="2.0", k="2")
        assert refused.status_code == 404, refused.text
        assert refused.json()["error"] == (f"version '2.0' of {MODEL_NAME} is not offered here; search the default "
                                           f"(no version)")
        with running_front(catalogue, torchserve.state_dir, extra=["--versions", "2.0"]) as allowing:
            versions = httpx.get(f"{allowing}/api/versions").json()["versions"]
            assert [(v["version"], v["default"], v["max_k"]) for v in versions] == [("1.0", True, 24),
                                                                                   ("2.0", False, 7)]
            assert versions[1]["categories"] == manifest["categories"]  # from the 2.0 archive in the store
            response = search(allowing, held_out_photo(), version="2.0", k="2")
            assert response.status_code == 200, response.text
            assert response.json()["model_version"] == "2.0"
            assert search(allowing, held_out_photo()).json()["model_version"] == "1.0"  # no version: the default
            other = search(allowing, held_out_photo(), version="3.0")
            assert other.status_code == 404
            assert other.json()["error"].endswith("search the default (no version), 2.0")
        # The default moves on to 2.0: the old default, not allowed, is no longer offered.
        assert search(front, held_out_photo(), version="1.0", k="1").json()["model_version"] == "1.0"
        client.set_default(MODEL_NAME, "2.0")
        moved = search(front, held_out_photo(), version="1.0", k="1")  # the front has not noticed yet
        assert moved.status_code == 404, moved.text
        assert moved.json()["error"] == (f"version '1.0' of {MODEL_NAME} is not offered here; search the default "
                                         f"(no version) (the default is now 2.0)")
        assert search(front, held_out_photo(), k="1").json()["model_version"] == "2.0"
        versions = httpx.get(f"{front}/api/versions").json()["versions"]
        assert [(v["version"], v["default"], v["max_k"]) for v in versions] == [("2.0", True, 7)]
        assert search(front, held_out_photo(), version="1.0").status_code == 404
    finally:
        registered = [v["modelVersion"] for v in client.versions(MODEL_NAME)]
        if client.default_version(MODEL_NAME) != "1.0":
            client.set_default(MODEL_NAME, "1.0")
        if "2.0" in registered:
            client.unregister(MODEL_NAME, "2.0", quiet=0.5)
        (model_store / f"{archive}.mar").unlink(missing_ok=True)


def test_service_starts_in_the_background_and_stops(torchserve, catalogue, tmp_path):
    state = tmp_path / "state"
    state.mkdir()  # its own state folder, so that web.pid and web.log stay out of the session TorchServe's
    shutil.copy(torchserve.config_path, state / "config.properties")
    shutil.copy(torchserve.key_file, state / "key_file.json")
    port = free_port()
    common = ["--state-dir", str(state), "--images", str(catalogue), "--model", MODEL_NAME, "--port", str(port)]
    started = subprocess.run([sys.executable, "-m", "web.service", "start", *common], cwd=ROOT, capture_output=True,
                             text=True, timeout=90)
    try:
        assert started.returncode == 0, started.stderr
        assert f"search page: http://127.0.0.1:{port}/" in started.stdout
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
        pid = int((state / "web.pid").read_text())
        again = subprocess.run([sys.executable, "-m", "web.service", "start", *common], cwd=ROOT,
                               capture_output=True, text=True, timeout=90)
        assert again.returncode == 1 and f"already runs (pid {pid})" in again.stderr
    finally:
        stopped = subprocess.run([sys.executable, "-m", "web.service", "stop", *common], cwd=ROOT,
                                 capture_output=True, text=True, timeout=90)
    assert stopped.returncode == 0 and "web front stopped" in stopped.stdout
    assert not Path(f"/proc/{pid}").exists() or b"web" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    missing = subprocess.run([sys.executable, "-m", "web", "--images", str(state / "nowhere")], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and missing.stderr.startswith("error: the catalogue image folder")
