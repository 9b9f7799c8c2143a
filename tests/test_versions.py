"""Versions through TorchServe's management API, on a TorchServe of this module's own: catalogue updates packed as
new versions, register / set-default / rollback / scale / unregister under a steady load, and the tool's errors."""
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from serving.manage import main as manage
from serving.management import ManagementClient, ManagementError
from serving.steady_load import SteadyLoad, main as steady_load
from serving.torchserve import free_port
from tests.fixtures import CATEGORIES, encode, product_photo, running_torchserve
from training.build_index import EMBEDDINGS_FILE
from training.update_catalogue import main as update_catalogue
from visual_search.catalogue import read_csv

MODEL = "versioned-search"
ARCHIVE_OPTIONS = ["--batch-size", "4", "--max-batch-delay", "20", "--startup-timeout", "120"]


def new_photos(folder, prefix, seed):
    """folder/<category>/<prefix>-<category>.png: one new product photo per category."""
    for c, category in enumerate(CATEGORIES):
        (folder / category).mkdir(parents=True)
        (folder / category / f"{prefix}-{category}.png").write_bytes(encode(product_photo(category, seed=seed + c)))
    return folder


@pytest.fixture(scope="module")
def versions(bundle_dir, photo_dir, tmp_path_factory):
    """Two archives of one model: v1 = the session bundle, v2 = v1 plus one new photo per category."""
    root = tmp_path_factory.mktemp("versions")
    store, added, catalogue = root / "store", new_photos(root / "new_photos", "added", 7000), root / "catalogue"
    shutil.copytree(photo_dir, catalogue)  # the catalogue image folder, which --add copies new photos into
    common = ["--name", MODEL, "--model-store", str(store), "--embed-batch-size", "8"]
    update_catalogue([*common, "--bundle", str(bundle_dir), "--data-dir", str(catalogue), *ARCHIVE_OPTIONS])
    update_catalogue([*common, "--add", str(added), "--out-dir", str(root / "bundle-v2")])
    record = json.loads((store / f"{MODEL}.versions.json").read_text())
    catalogues = {}
    for entry in record["versions"]:
        lines = (Path(entry["bundle"]) / "catalogue.csv").read_text().splitlines()[1:]
        catalogues[entry["version"]] = {line.split(",")[0] for line in lines}
    return {"store": store, "record": record, "catalogues": catalogues, "root": root, "catalogue": catalogue,
            "added": {f"added-{c}" for c in CATEGORIES}}


@pytest.fixture(scope="module")
def server(versions, tmp_path_factory):
    with running_torchserve(tmp_path_factory.mktemp("ts-versions"), versions["store"],
                            [f"{MODEL}={MODEL}-v1.mar"]) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return ManagementClient.from_state(server.state_dir, timeout=120)


def cli(server, *argv):
    return manage(["--state-dir", str(server.state_dir), "--timeout", "120", *argv])


def ask(server, version=None, k=None, headers=None, timeout=60):
    url = f"{server.urls['inference']}/predictions/{MODEL}" + (f"/{version}" if version else "")
    headers = {**(headers or server.headers()), **({"X-Top-K": str(k)} if k else {})}
    return requests.post(url, data=encode(product_photo("bags", seed=4242), "JPEG"), headers=headers,
                         timeout=timeout)


def test_catalogue_updates_are_numbered_and_recorded(versions):
    v1, v2 = versions["record"]["versions"]
    assert (v1["version"], v1["archive"], v2["version"], v2["archive"]) == \
        ("1.0", f"{MODEL}-v1.mar", "2.0", f"{MODEL}-v2.mar")
    assert v2["items"] == v1["items"] + len(CATEGORIES) and "added 3 item(s)" in v2["change"]
    assert v1["weights_sha256"] == v2["weights_sha256"] and v1["index_sha256"] != v2["index_sha256"]
    assert all((versions["store"] / v["archive"]).is_file() and v["built"] for v in (v1, v2))
    assert versions["catalogues"]["2.0"] - versions["catalogues"]["1.0"] == versions["added"]
    assert v1["data_dir"] == v2["data_dir"] == str(versions["catalogue"].resolve())
    # One rule: every image reference is relative to the catalogue image folder, and the file is there.
    items = read_csv(Path(v2["bundle"]) / "catalogue.csv")
    assert [it.image for it in items if it.id.startswith("added-")] == [f"{c}/added-{c}.png" for c in CATEGORIES]
    for it in items:
        assert not Path(it.image).is_absolute() and (versions["catalogue"] / it.image).is_file(), it


def test_remove_by_id_and_bad_updates(versions):
    store, root = str(versions["store"]), versions["root"]
    common = ["--name", MODEL, "--model-store", store, "--out-dir", str(root / "bundle-v3")]
    for argv, message in (([], "nothing to change"), (["--remove", "no-such-id"], "no-such-id"),
                          (["--add", str(root / "missing")], "not found"),
                          (["--add", str(root / "new_photos")], "ids already in the catalogue: added-bags")):
        with pytest.raises(SystemExit, match=message):
            update_catalogue([*common, *argv])
    removed = sorted(versions["added"])[:1] + [sorted(versions["catalogues"]["1.0"])[0]]
    entry = update_catalogue([*common, "--remove", *removed])
    assert entry["version"] == "3.0" and entry["items"] == len(versions["catalogues"]["2.0"]) - 2
    assert entry["archive_options"] == ARCHIVE_OPTIONS and "removed 2 item(s)" in entry["change"]
    ids = {line.split(",")[0] for line in (root / "bundle-v3" / "catalogue.csv").read_text().splitlines()[1:]}
    assert ids == versions["catalogues"]["2.0"] - set(removed)


def test_readme_update_sequence_add_remove_retrain(bundle_dir, photo_dir, trained_run, tmp_path):
    """README's step 2 in order: --add (twice, once with a URL prefix), --remove, then --checkpoint, which re-embeds
    every item, old and added, from the one catalogue image folder."""
    catalogue = tmp_path / "catalogue"
    shutil.copytree(photo_dir, catalogue)
    common = ["--name", "readme-search", "--model-store", str(tmp_path / "store"), "--embed-batch-size", "8",
              *ARCHIVE_OPTIONS]
    update_catalogue([*common, "--bundle", str(bundle_dir), "--data-dir", str(catalogue)])
    update_catalogue([*common, "--add", str(new_photos(tmp_path / "new", "new", 8000))])
    cdn = "https://cdn.example.com/products/"
    update_catalogue([*common, "--add", str(new_photos(tmp_path / "cdn", "cdn", 9000)), "--image-prefix", cdn])
    update_catalogue([*common, "--remove", "new-bags", "bags-00"])
    entry = update_catalogue([*common, "--checkpoint", str(trained_run / "last.pt"), "--data-dir", str(catalogue)])

    assert entry["version"] == "5.0" and entry["items"] == 24 + 3 + 3 - 2
    bundle = Path(entry["bundle"])
    items = {it.id: it.image for it in read_csv(bundle / "catalogue.csv")}
    assert items["new-shoes"] == "shoes/new-shoes.png" and items["cdn-shoes"] == f"{cdn}shoes/cdn-shoes.png"
    assert "new-bags" not in items and "bags-00" not in items
    for category in CATEGORIES:  # copied into the catalogue image folder, byte for byte
        for prefix, folder in (("new", tmp_path / "new"), ("cdn", tmp_path / "cdn")):
            name = f"{category}/{prefix}-{category}.png"
            assert (catalogue / name).read_bytes() == (folder / name).read_bytes()
    # The same weights re-embedded every item from the folder: the vectors match the ones kept before.
    before = np.load(Path(json.loads((tmp_path / "store" / "readme-search.versions.json").read_text())
                          ["versions"][3]["bundle"]) / EMBEDDINGS_FILE)
    assert np.allclose(np.load(bundle / EMBEDDINGS_FILE), before, atol=1e-4)

    clash = tmp_path / "clash" / "bags"  # bags-00 is out of the catalogue, but its photo is still in the folder
    clash.mkdir(parents=True)
    (clash / "bags-00.png").write_bytes(encode(product_photo("bags", seed=10)))  # another photo, the same name
    with pytest.raises(SystemExit, match="different file is already in the catalogue image folder"):
        update_catalogue([*common, "--add", str(clash.parent)])
    assert (catalogue / "bags" / "bags-00.png").read_bytes() == (photo_dir / "bags" / "bags-00.png").read_bytes()


def test_add_without_a_catalogue_image_folder_says_what_to_pass(bundle_dir, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "image_root": None}))  # a bundle that has none
    common = ["--name", "no-folder", "--model-store", str(tmp_path / "store"), *ARCHIVE_OPTIONS]
    with pytest.raises(SystemExit, match="--add needs the catalogue image folder.*pass --data-dir"):
        update_catalogue([*common, "--bundle", str(bundle), "--add", str(new_photos(tmp_path / "n", "n", 1))])


def test_each_version_answers_from_its_own_catalogue(server, client, versions):
    v1_ids, v2_ids = versions["catalogues"]["1.0"], versions["catalogues"]["2.0"]
    assert client.register(f"{MODEL}-v2.mar", workers=1) == (MODEL, "2.0")
    assert client.default_version(MODEL) == "1.0"  # registering does not switch

    by_default, by_v2 = ask(server, k=len(v1_ids)), ask(server, "2.0", k=len(v2_ids))
    assert by_default.status_code == 200 and by_v2.status_code == 200, (by_default.text, by_v2.text)
    assert by_default.json()["model_version"] == "1.0" and by_v2.json()["model_version"] == "2.0"
    assert {n["id"] for n in by_default.json()["neighbours"]} == v1_ids
    assert {n["id"] for n in by_v2.json()["neighbours"]} == v2_ids
    assert ask(server, k=len(v2_ids)).status_code == 400  # v1 has fewer items than that

    assert client.set_default(MODEL, "2.0") == "1.0"
    answer = ask(server, k=len(v2_ids)).json()
    assert answer["model_version"] == "2.0" and {n["id"] for n in answer["neighbours"]} == v2_ids
    assert client.rollback(MODEL) == ("2.0", "1.0")
    assert ask(server).json()["model_version"] == "1.0"
    client.unregister(MODEL, "2.0")
    assert [v["modelVersion"] for v in client.versions(MODEL)] == ["1.0"]


def test_rollout_rollback_and_scaling_under_load_fail_no_request(server, versions, capsys):
    """Three clients post continuously while the tool registers v2, makes it the default, scales it up, rolls
    back to v1, scales v2 down and unregisters it. Every request must succeed, and every answer must come from v1 or v2,
    with neighbours from that version's own catalogue."""
    k = len(versions["catalogues"]["1.0"])
    load = SteadyLoad(f"{server.urls['inference']}/predictions/{MODEL}", {**server.headers(), "X-Top-K": str(k)},
                      encode(product_photo("bags", seed=4242), "JPEG"), clients=3, max_seconds=150).start()
    steps = [(("register", f"{MODEL}-v2.mar", "--workers", "1"), "1.0"), (("set-default", MODEL, "2.0"), "2.0"),
             (("scale", MODEL, "2.0", "--workers", "2"), "2.0"), (("list", MODEL), "2.0"),
             (("scale", MODEL, "2.0", "--workers", "1"), "refused"), (("rollback", MODEL), "1.0"),
             (("scale", MODEL, "2.0", "--workers", "1"), "1.0"),
             (("unregister", MODEL, "2.0"), "1.0")]
    timeline, refusals, start = [], [], time.time()
    try:
        assert load.wait_for("1.0"), load.summary()
        for argv, serving in steps:
            if serving == "refused":  # fewer workers for the default version would fail their batches
                with pytest.raises(SystemExit):
                    cli(server, *argv)
                refusals.append(capsys.readouterr())
                continue
            cli(server, *argv)
            assert load.wait_for(serving), f"after {argv[0]}, no answers from {serving}: {load.summary()}"
            timeline.append(f"{argv[0]} {time.time() - start:.1f}s/{len(load.snapshot())}")
    finally:
        results = load.stop()

    assert "pass --force" in refusals[0].err, refusals
    out = refusals[0].out + capsys.readouterr().out
    assert "default 1.0 -> 2.0" in out and "rolled back, default 2.0 -> 1.0" in out, out
    assert f"{MODEL}  2.0      *" in out and "2 ready (2-2)" in out, out
    failures = load.failures()
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:5]}"
    assert {r[1] for r in results} == {"1.0", "2.0"}
    for status, version, ids, _ in results:
        assert ids <= versions["catalogues"][version] and len(ids) == k
    print(f"\nsteps done at (elapsed/requests so far): {', '.join(timeline)}\n{load.summary()}")


def test_calls_without_the_token_are_refused(server, versions, tmp_path, capsys):
    for url in (f"{server.urls['management']}/models", f"{server.urls['management']}/models/{MODEL}"):
        assert requests.get(url, timeout=30).status_code in (400, 401)
        assert requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code in (400, 401)
    register = f"{server.urls['management']}/models?url={MODEL}-v2.mar&initial_workers=1"
    assert requests.post(register, headers=server.headers("inference"), timeout=30).status_code in (400, 401)
    assert ask(server, headers={"Authorization": "Bearer wrong"}).status_code in (400, 401)

    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"management": {"key": "wrong"}, "API": {"key": "wrong"}}))
    with pytest.raises(SystemExit) as exit_info:
        cli(server, "--key-file", str(key_file), "list")
    assert exit_info.value.code == 1 and "refused the management token" in capsys.readouterr().err


def test_archives_load_only_from_the_model_store(server, client, versions):
    archive = versions["store"] / f"{MODEL}-v2.mar"
    for url in (archive.as_uri(), f"http://127.0.0.1:{free_port()}/{MODEL}-v2.mar"):
        with pytest.raises(ManagementError, match="does not match any allowed URL"):
            client.call("POST", "/models", {"url": url, "initial_workers": 1})
    assert [v["modelVersion"] for v in client.versions(MODEL)] == ["1.0"]


@pytest.mark.parametrize("argv, message", [
    (["list", "no-such-model"], "unknown model or version: Model not found: no-such-model"),
    (["set-default", MODEL, "9.0"], "unknown model or version"),
    (["unregister", MODEL, "9.0"], "unknown model or version"),
    (["scale", MODEL, "9.0", "--workers", "1"], "unknown model or version"),
    (["register", "no-such-archive.mar"], "not an archive in the model store"),
    (["register", "/tmp/elsewhere/x.mar"], "not an archive in the model store"),
    (["register", f"{MODEL}-v1.mar"], "already registered"),
    (["rollback", MODEL], "no earlier default"),
    (["scale", MODEL, "1.0", "--workers", "0"], "needs at least one worker"),
    (["--management-url", "http://127.0.0.1:{port}", "list"], "unreachable"),
    (["--key-file", "{missing}", "list"], "cannot read the key file"),
])
def test_tool_errors_print_a_message_and_exit_1(server, tmp_path, capsys, argv, message):
    argv = [a.format(port=free_port(), missing=tmp_path / "none.json") for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli(server, *argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: ") and message in err, err


def test_steady_load_tool_counts_versions_and_failures(server, capsys):
    argv = ["--host", server.urls["inference"], "--state-dir", str(server.state_dir), "--model", MODEL,
            "--clients", "2", "--seconds", "3"]
    with pytest.raises(SystemExit) as exit_info:
        steady_load(argv)
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "0 failed, answered by 1.0:" in out, out
    with pytest.raises(SystemExit, match="not a loopback address"):
        steady_load([*argv[:1], "http://192.0.2.1:8080", *argv[2:]])
