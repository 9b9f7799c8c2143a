"""What the web front offers, and to whom, over real HTTP against the session's real TorchServe: the images of
answered items only, the default version and the allowed ones only, the inference key only and no management
call, and no POST from another site's page.
"""
import json
import shutil
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import requests

from serving.torchserve import ROOT
from tests.conftest import MODEL_NAME
from tests.fixtures import encode, product_photo
from tests.test_web import held_out_photo, running_front, search

REMOVED = "bags/bags-99.png"  # a photo left in the folder by a listing that is no longer in the catalogue


@pytest.fixture(scope="module")
def folder(photo_dir, tmp_path_factory):
    """A copy of the session's photo folder, plus a photo of no catalogue item."""
    images = tmp_path_factory.mktemp("web-access") / "catalogue"
    shutil.copytree(photo_dir, images)
    (images / REMOVED).write_bytes(encode(product_photo("bags", 99)))
    return images


@pytest.fixture(scope="module")
def front(torchserve, folder):
    with running_front(folder, torchserve.state_dir) as url:
        yield url


def image_status(front, reference):
    return httpx.get(f"{front}/images/{reference}").status_code


def torchserve_requests(server, action):
    """The request lines of TorchServe's access log ("POST /predictions/tiny-search") logged while `action` ran:
    those before a marker request sent after it."""
    log = server.state_dir / "logs" / "access_log.log"
    start = log.stat().st_size
    action()
    marker = uuid.uuid4().hex
    requests.get(f"{server.urls['inference']}/ping", params={"marker": marker}, headers=server.headers(), timeout=30)
    deadline = time.time() + 30
    while True:
        text = log.read_bytes()[start:].decode(errors="replace")
        if marker in text:
            lines = text[:text.index(marker)].splitlines()[:-1]  # the marker's own line is the last
            return [line.split('"')[1] for line in lines if line.count('"') >= 2]
        assert time.time() < deadline, "the marker request never reached the access log"
        time.sleep(0.2)


# -- images: only those of items in answers the front forwarded ------------------------------------------------------

def test_only_images_of_answered_items_are_served(front, folder):
    assert (folder / REMOVED).is_file() and (folder / "bags/bags-03.jpg").is_file()
    assert image_status(front, REMOVED) == 404  # in the folder, in no answer
    assert image_status(front, "bags/bags-03.jpg") == 404  # a catalogue item, but no answer has named it yet
    answer = search(front, None, listing="bags-03", k="3").json()
    named = [answer["listing"]["image"], *(n["image"] for n in answer["neighbours"])]
    assert named[0] == "bags/bags-03.jpg" and len(set(named)) == 4
    for reference in named:
        response = httpx.get(f"{front}/images/{reference}")
        assert response.status_code == 200, reference
        assert response.content == (folder / reference).read_bytes()
    unnamed = next(f"{p.parent.name}/{p.name}" for p in sorted(folder.glob("*/*-0*"))
                   if f"{p.parent.name}/{p.name}" not in named)
    missing = httpx.get(f"{front}/images/{unnamed}")
    assert missing.status_code == 404 and missing.json() == {"error": "not a catalogue image", "status": 404}
    assert image_status(front, REMOVED) == 404


def test_the_remembered_images_are_bounded(torchserve, folder):
    with running_front(folder, torchserve.state_dir, extra=["--remembered-images", "2"]) as bounded:
        answer = search(bounded, held_out_photo(), k="3").json()
        first, second, third = (n["image"] for n in answer["neighbours"])
        assert image_status(bounded, first) == 404  # forgotten: the two most recent are remembered
        assert [image_status(bounded, second), image_status(bounded, third)] == [200, 200]
        # Two more: the listing's neighbour, then the listing itself; the earlier ones are forgotten.
        more = search(bounded, None, listing=answer["neighbours"][0]["id"], k="1").json()
        latest = [more["neighbours"][0]["image"], more["listing"]["image"]]
        assert latest[1] == first
        assert [image_status(bounded, reference) for reference in latest] == [200, 200]
        assert [image_status(bounded, r) for r in (second, third) if r not in latest] == [404] * len(
            {second, third} - set(latest))


@pytest.mark.parametrize("option, value, message", [
    ("--remembered-images", "0", "'0' is not a whole number of at least 1"),
    ("--versions", "2.0,../ping", "'../ping' is not a version"),
    ("--allowed-origin", "evil.example", "'evil.example' is not an origin"),
    ("--allowed-origin", "https://a.example/path", "'https://a.example/path' is not an origin"),
])
def test_bad_option_values_are_refused(folder, option, value, message):
    result = subprocess.run([sys.executable, "-m", "web", "--images", str(folder), option, value], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


# -- the inference key only, and no management call -----------------------------------------------------------------

def test_the_front_needs_the_inference_key_alone_and_makes_no_management_call(torchserve, folder, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(torchserve.config_path, state / "config.properties")
    inference_only = {"inference": json.loads(torchserve.key_file.read_text())["inference"]}
    (state / "key_file.json").write_text(json.dumps(inference_only))
    with running_front(folder, state) as url:
        def unknown_versions():
            for version in ("9.9", "2.0", "0.1", "latest", "1.0.0"):
                refused = search(url, held_out_photo(), version=version)
                assert refused.status_code == 404 and "is not offered here" in refused.json()["error"], version

        assert torchserve_requests(torchserve, unknown_versions) == []  # refused from the allow-list alone

        answers = {}

        def browse():
            answers["versions"] = httpx.get(f"{url}/api/versions")
            answers["search"] = search(url, held_out_photo(), k="2")
            answers["by_name"] = search(url, held_out_photo(), version="1.0", k="2")

        calls = torchserve_requests(torchserve, browse)
        assert calls == [f"POST /predictions/{MODEL_NAME} HTTP/1.1"] * 3, calls  # the default asked once, 2 searches
    versions = answers["versions"]
    assert versions.status_code == 200, versions.text
    assert [(v["version"], v["default"], v["items"]) for v in versions.json()["versions"]] == [("1.0", True, 24)]
    assert answers["search"].status_code == 200 and answers["search"].json()["model_version"] == "1.0"
    assert answers["by_name"].status_code == 200 and answers["by_name"].json()["model_version"] == "1.0"


# -- no POST from another site's page --------------------------------------------------------------------------------

def listing_search(url, **headers):
    return httpx.post(f"{url}/api/search", data={"listing": "bags-01", "k": "1"}, headers=headers, timeout=120)


def test_posts_from_another_origin_are_refused(front, torchserve):
    port = front.rsplit(":", 1)[1]
    refused = {}

    def cross_site():
        refused["evil"] = listing_search(front, Origin="http://evil.example")
        refused["null"] = listing_search(front, Origin="null")
        refused["other port"] = listing_search(front, Origin="http://127.0.0.1:1")
        refused["other host"] = listing_search(front, Origin=f"http://localhost:{port}")
        refused["https"] = listing_search(front, Origin=f"https://127.0.0.1:{port}")
        refused["fetch metadata"] = listing_search(front, **{"Sec-Fetch-Site": "cross-site"})
        refused["another route"] = httpx.post(f"{front}/api/versions", headers={"Origin": "http://evil.example"})

    assert torchserve_requests(torchserve, cross_site) == []  # refused before anything is forwarded
    for case, response in refused.items():
        assert response.status_code == 403, case
        assert response.json()["status"] == 403 and response.json()["error"].startswith(
            "cross-site request refused: "), case
    assert refused["evil"].json()["error"] == ("cross-site request refused: Origin http://evil.example is not this "
                                               "page's origin")
    assert refused["fetch metadata"].json()["error"] == "cross-site request refused: Sec-Fetch-Site is cross-site"

    assert listing_search(front).status_code == 200  # no Origin: curl, scripts
    assert listing_search(front, Origin=front).status_code == 200
    assert listing_search(front, Origin=front, **{"Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert listing_search(front, Origin=f"http://localhost:{port}", Host=f"localhost:{port}").status_code == 200
    assert httpx.get(f"{front}/api/versions", headers={"Origin": "http://evil.example"}).status_code == 200


def test_an_allowed_origin_may_post(torchserve, folder):
    with running_front(folder, torchserve.state_dir,
                       extra=["--allowed-origin", "https://search.example.com,https://proxy.example:8443"]) as url:
        for origin in ("https://search.example.com", "https://proxy.example:8443"):
            allowed = listing_search(url, Origin=origin, **{"Sec-Fetch-Site": "cross-site"})
            assert allowed.status_code == 200, (origin, allowed.text)
        assert listing_search(url, Origin=url).status_code == 200
        assert listing_search(url, Origin="https://search.example.com:444").status_code == 403
        assert listing_search(url, Origin="http://search.example.com").status_code == 403
