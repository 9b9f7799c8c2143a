"""The curl lines of README.md and docs/api.md, run as written (real curl, through bash) against a real TorchServe
serving the test model under README's model name, in a folder with photo.jpg and .torchserve/key_file.json and each
block's assignments first. Only host:port, and the demo's example listing id and categories, are substituted."""
import json
import os
import re
import subprocess

import pytest

from loadtests.photos import encode, product_jpeg, product_photo
from serving.build_archive import main as build_archive
from serving.torchserve import ROOT
from tests.fixtures import running_torchserve
from visual_search.bundle import load_bundle

DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "api.md")
MODEL, VERSION = "visual-search", "2.0"  # README's name; 2.0 answers both /visual-search and /visual-search/2.0
PORTS = {"8080": "inference", "8081": "management", "8082": "metrics"}
STATUS_MARK = "\nHTTP_STATUS="
DEMO_LISTING, DEMO_CATEGORIES = "fmnist-train-09615", {"coat,shirt": "shoes,bags", "category=coat": "category=shoes"}


def bash_blocks(text):
    """The ```bash blocks of a markdown text, each as a list of commands (continuation lines joined)."""
    blocks = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", body)
        blocks.append([line.strip() for line in joined.splitlines()
                       if line.strip() and not line.strip().startswith("#")])
    return blocks


def readme_calls():
    """[(prelude, command)]: every curl command of the documents, with the assignments of its block."""
    calls = []
    for block in (block for document in DOCUMENTS for block in bash_blocks(document.read_text())):
        prelude = [line for line in block if re.match(r"^[A-Z_]+=", line)]
        calls += [(prelude, line) for line in block if re.search(r"\bcurl\b", line)]
    return calls


CALLS = readme_calls()


def test_readme_has_the_documented_calls():
    """So that the test below cannot pass by finding nothing."""
    inference = [c for _, c in CALLS if "/predictions/" in c or "/invoke" in c]
    assert len(inference) >= 10, inference
    assert any("listing" in c for c in inference) and any("X-Category" in c for c in inference)
    assert any("X-Output: embedding" in c for c in inference) and any("-F image=@" in c for c in inference)
    assert any("application/json" in c for c in inference) and any("/invoke?" in c for c in inference)


@pytest.fixture(scope="module")
def readme_server(calibrated_bundle_dir, tmp_path_factory):
    """The bundle with a calibrated near-duplicate threshold, so that the documents' duplicates calls answer."""
    store = tmp_path_factory.mktemp("readme-store")
    build_archive(["--bundle", str(calibrated_bundle_dir), "--name", MODEL, "--version", VERSION, "--model-store",
                   str(store), "--batch-size", "4", "--max-batch-delay", "20", "--startup-timeout", "120"])
    with running_torchserve(tmp_path_factory.mktemp("readme-ts"), store, [f"{MODEL}.mar"]) as server:
        yield server


@pytest.fixture(scope="module")
def reader_dir(readme_server, tmp_path_factory):
    """Where the reader types the commands: photo.jpg and photo.png (640x480 product photos) and .torchserve/ (the
    keys)."""
    folder = tmp_path_factory.mktemp("reader")
    (folder / "photo.jpg").write_bytes(product_jpeg(7, (640, 480)))
    (folder / "photo.png").write_bytes(encode(product_photo("shoes", seed=7, size=(640, 480)), "PNG"))
    (folder / ".torchserve").symlink_to(readme_server.state_dir, target_is_directory=True)
    assert (folder / ".torchserve" / "key_file.json").is_file()
    # curl reads its settings from $CURL_HOME/.curlrc: the status is appended to the output, the lines stay as written
    (folder / ".curlrc").write_text(f'write-out = "{STATUS_MARK.encode("unicode_escape").decode()}%{{http_code}}"\n')
    return folder


@pytest.fixture(scope="module")
def test_listing(calibrated_bundle_dir):
    """A shoe of the test catalogue, standing in for README's demo listing."""
    catalogue = load_bundle(calibrated_bundle_dir).catalogue
    try:
        return next(it for it in catalogue.all_items() if it.category == "shoes")
    finally:
        catalogue.close()


def run_as_typed(prelude, command, server, folder, listing):
    script = "\n".join(["set -e", *prelude, command]).replace(DEMO_LISTING, listing.id)
    for demo, ours in DEMO_CATEGORIES.items():
        script = script.replace(demo, ours)
    for port, api in PORTS.items():
        script = script.replace(f"127.0.0.1:{port}", server.urls[api].removeprefix("http://"))
    env = {**os.environ, "CURL_HOME": str(folder), "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (command, result.stderr)
    body, _, status = result.stdout.rpartition(STATUS_MARK)
    return int(status), body


def expected_k(command):
    match = re.search(r"X-Top-K: (\d+)|\bk=(\d+)|\"k\": (\d+)", command)
    return int(next(g for g in match.groups() if g)) if match else 4


@pytest.mark.parametrize("prelude, command", CALLS, ids=[f"line{i}" for i in range(len(CALLS))])
def test_readme_curl_line_works_as_typed(readme_server, reader_dir, test_listing, prelude, command):
    status, body = run_as_typed(prelude, command, readme_server, reader_dir, test_listing)
    assert status == 200, (command, status, body[:500])
    if "/metrics" in command:
        assert "# TYPE" in body and "ts_inference_requests_total" in body
        return
    answer = json.loads(body)
    if ":8081/" in command:
        assert answer[0]["modelName"] == MODEL and answer[0]["workers"][0]["status"] == "READY"
    elif "X-Output: embedding" in command:
        assert answer["dim"] == len(answer["embedding"]) == 2048 and answer["model"] == MODEL
    else:
        k = expected_k(command)
        assert answer["model"] == MODEL and answer["model_version"] == VERSION and answer["k"] == k
        assert len(answer["neighbours"]) == k and all(not n["image"].startswith("/") for n in answer["neighbours"])
        assert ", " not in body and "\n" not in body.strip()  # compact JSON
        ids = [n["id"] for n in answer["neighbours"]]
        if DEMO_LISTING in command:  # by listing, or the listing excluded: never among the neighbours
            assert test_listing.id not in ids
        if "listing" in command:
            assert answer["listing"]["id"] == test_listing.id and answer["confidence"] is None
            assert answer["category"] == test_listing.category
        for demo, ours in DEMO_CATEGORIES.items():
            if demo in command:
                assert {n["category"] for n in answer["neighbours"]} <= set(ours.split("=")[-1].split(","))
