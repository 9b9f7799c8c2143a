"""Versions through TorchServe's management API, on a TorchServe of this module's own: catalogue updates packed as
new versions (the catalogue folder updated in place, bundled or outside, or re-embedded with retrained weights),
removed ids that never come back, register / set-default / rollback / scale / unregister under a steady load, and
the tool's errors."""
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import faiss
import numpy as np
import pytest
import requests

from loadtests.steady_load import SteadyLoad
from loadtests.steady_load import main as steady_load
from serving.manage import main as manage
from serving.management_client import ManagementClient, ManagementError
from serving.torchserve import free_port
from tests.fixtures import CATEGORIES, encode, product_photo, running_torchserve
from training.build_index import main as build_index
from training.next_version import ADDED_EMBEDDINGS_FILE, remembered
from training.next_version import main as update_catalogue
from visual_search.catalogue.index import ivf_of, open_index
from visual_search.catalogue.store import open_catalogue, verify_catalogue

MODEL = "versioned-search"
ARCHIVE_OPTIONS = ["--batch-size", "4", "--max-batch-delay", "20", "--startup-timeout", "120"]
REMOVED = ["added-bags", "bags-00"]  # v3 takes out an item that v2 added and one of v1's


def new_photos(folder, prefix, seed):
    """folder/<category>/<prefix>-<category>.png: one new product photo per category."""
    for c, category in enumerate(CATEGORIES):
        (folder / category).mkdir(parents=True)
        (folder / category / f"{prefix}-{category}.png").write_bytes(encode(product_photo(category, seed=seed + c)))
    return folder


def catalogue_of(entry):
    """The catalogue folder a recorded version names, opened against the reference in its bundle's manifest."""
    manifest = json.loads((Path(entry["bundle"]) / "manifest.json").read_text())
    return open_catalogue(entry["catalogue_dir"], expect=manifest["catalogue"])


def items_of(entry):
    """{id: Item} of a recorded version's catalogue."""
    catalogue = catalogue_of(entry)
    try:
        return {it.id: it for it in catalogue.all_items()}
    finally:
        catalogue.close()


def vectors_of(entry, ids):
    catalogue = catalogue_of(entry)
    try:
        return np.stack([catalogue.vector(i) for i in ids])
    finally:
        catalogue.close()


def record_of(store, name):
    return json.loads((Path(store) / f"{name}.versions.json").read_text())


@pytest.fixture(scope="module")
def versions(bundle_dir, photo_dir, tmp_path_factory):
    """Three archives of one model: v1 = the session bundle, v2 = v1 plus one new photo per category, v3 = v2 plus
    one more photo per category less REMOVED (one update, the ids read from a file)."""
    root = tmp_path_factory.mktemp("versions")
    store, catalogue = root / "store", root / "catalogue"
    shutil.copytree(photo_dir, catalogue)  # the catalogue image folder, which --add copies new photos into
    common = ["--name", MODEL, "--model-store", str(store), "--embed-batch-size", "8"]
    update_catalogue([*common, "--bundle", str(bundle_dir), "--data-dir", str(catalogue), *ARCHIVE_OPTIONS])
    update_catalogue([*common, "--add", str(new_photos(root / "new_photos", "added", 7000)),
                      "--out-dir", str(root / "bundle-v2")])
    (root / "remove.txt").write_text("\n".join(REMOVED) + "\n")
    update_catalogue([*common, "--add", str(new_photos(root / "late_photos", "late", 7100)),
                      "--remove-file", str(root / "remove.txt"), "--out-dir", str(root / "bundle-v3")])
    record = record_of(store, MODEL)
    items = {entry["version"]: items_of(entry) for entry in record["versions"]}
    return {"store": store, "record": record, "items": items, "root": root, "catalogue": catalogue,
            "catalogues": {version: set(its) for version, its in items.items()},
            "added": {f"added-{c}" for c in CATEGORIES}, "late": {f"late-{c}" for c in CATEGORIES}}


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


def ask(server, version=None, k=None, headers=None, timeout=60, photo=None, model=MODEL):
    url = f"{server.urls['inference']}/predictions/{model}" + (f"/{version}" if version else "")
    headers = {**(headers or server.headers()), **({"X-Top-K": str(k)} if k else {})}
    body = photo if photo is not None else encode(product_photo("bags", seed=4242), "JPEG")
    return requests.post(url, data=body, headers=headers, timeout=timeout)


def neighbour_ids(response):
    assert response.status_code == 200, response.text
    return [n["id"] for n in response.json()["neighbours"]]


def test_catalogue_updates_are_numbered_and_recorded(versions, bundle_dir):
    v1, v2, v3 = versions["record"]["versions"]
    assert [(v["version"], v["archive"]) for v in (v1, v2, v3)] == \
        [(f"{n}.0", f"{MODEL}-v{n}.mar") for n in (1, 2, 3)]
    catalogues = versions["catalogues"]
    assert v2["items"] == v1["items"] + len(CATEGORIES) == len(catalogues["2.0"])
    assert "added 3 item(s)" in v2["change"]
    assert catalogues["2.0"] - catalogues["1.0"] == versions["added"]
    assert catalogues["3.0"] == (catalogues["2.0"] | versions["late"]) - set(REMOVED)
    assert v3["items"] == len(catalogues["3.0"])
    assert "removed 2 item(s): added-bags, bags-00" in v3["change"] and "added 3 item(s)" in v3["change"]
    assert v1["weights_sha256"] == v2["weights_sha256"] == v3["weights_sha256"]
    assert len({v["catalogue_uid"] for v in (v1, v2, v3)}) == 3
    assert len({v["catalogue_manifest_sha256"] for v in (v1, v2, v3)}) == 3
    assert all(v["bundled"] and v["catalogue_dir"] == str(Path(v["bundle"]) / "catalogue") for v in (v1, v2, v3))
    assert v1["bundle"] == str(bundle_dir.resolve())
    assert all((versions["store"] / v["archive"]).is_file() and v["built"] for v in (v1, v2, v3))
    assert v1["data_dir"] == v2["data_dir"] == v3["data_dir"] == str(versions["catalogue"].resolve())
    assert v1["archive_options"] == v2["archive_options"] == v3["archive_options"] == ARCHIVE_OPTIONS
    # One rule: every image reference is relative to the catalogue image folder, and the file is there.
    items = versions["items"]["3.0"]
    assert [items[f"late-{c}"].image for c in CATEGORIES] == [f"{c}/late-{c}.png" for c in CATEGORIES]
    for it in items.values():
        assert not Path(it.image).is_absolute() and (versions["catalogue"] / it.image).is_file(), it


def test_updates_reuse_the_source_index_and_vectors(versions):
    """An update is made in place: the new catalogue names its source as parent, counts the change since the
    index was trained (no retraining), shares the old vector files (nothing re-embedded) and leaves the old
    version's folder as it was."""
    record = versions["record"]["versions"]
    changed = {"2.0": 3, "3.0": 3 + 3 + 2}
    for older, newer in zip(record, record[1:]):
        old, new = catalogue_of(older), catalogue_of(newer)
        try:
            assert new.manifest["parent"]["uid"] == old.uid == older["catalogue_uid"]
            assert new.manifest["changed_since_training"] == changed[newer["version"]]
            assert new.manifest["training"] == old.manifest["training"]
            assert new.manifest["factory"] == old.manifest["factory"] and new.manifest["profile"] == "exact"
            for segment in old.manifest["segments"]:  # the old vectors are the same file, hard-linked
                assert os.stat(old.folder / segment["file"]).st_ino == os.stat(new.folder / segment["file"]).st_ino
            kept = sorted(versions["catalogues"][older["version"]] & versions["catalogues"][newer["version"]])
            assert np.array_equal(np.stack([new.vector(i) for i in kept]), np.stack([old.vector(i) for i in kept]))
        finally:
            old.close()
            new.close()
    # Only the new photos were embedded.
    assert np.load(Path(record[1]["bundle"]) / ADDED_EMBEDDINGS_FILE).shape == (len(CATEGORIES), 2048)
    # The older versions' folders are untouched: every file still has the size and sha256 it was published with.
    for entry in record:
        assert verify_catalogue(entry["catalogue_dir"], progress=False)["uid"] == entry["catalogue_uid"]


def test_bad_updates_are_refused_and_change_nothing(versions):
    store, root = versions["store"], versions["root"]
    refused = root / "bundle-refused"
    common = ["--name", MODEL, "--model-store", str(store), "--out-dir", str(refused)]
    before = (record_of(store, MODEL), sorted(p.name for p in store.iterdir()))
    for argv, message in (([], "nothing to change"), (["--remove", "no-such-id"], "no-such-id"),
                          (["--remove", "bags-00"], "not in the catalogue of .*: bags-00"),
                          (["--remove-file", str(root / "none.txt")], "--remove-file not found"),
                          (["--add", str(root / "missing")], "not found"),
                          (["--add", str(root / "new_photos")], "ids already in the catalogue: added-phones"),
                          (["--remove", "bags-01", "--out-dir", str(root / "bundle-v2")], "already holds a bundle")):
        with pytest.raises(SystemExit, match=message):
            update_catalogue([*common, *argv])
    assert (record_of(store, MODEL), sorted(p.name for p in store.iterdir())) == before
    assert not refused.exists()


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
    removed = update_catalogue([*common, "--remove", "new-bags", "bags-00"])
    entry = update_catalogue([*common, "--checkpoint", str(trained_run / "last.pt"), "--data-dir", str(catalogue)])

    assert entry["version"] == "5.0" and entry["items"] == 24 + 3 + 3 - 2
    assert entry["bundled"] and Path(entry["bundle"]) == bundle_dir.parent / "readme-search-v5"
    items = {it_id: it.image for it_id, it in items_of(entry).items()}
    assert items["new-shoes"] == "shoes/new-shoes.png" and items["cdn-shoes"] == f"{cdn}shoes/cdn-shoes.png"
    assert "new-bags" not in items and "bags-00" not in items and len(items) == entry["items"]
    for category in CATEGORIES:  # copied into the catalogue image folder, byte for byte
        for prefix, folder in (("new", tmp_path / "new"), ("cdn", tmp_path / "cdn")):
            name = f"{category}/{prefix}-{category}.png"
            assert (catalogue / name).read_bytes() == (folder / name).read_bytes()
    # A fresh catalogue with the source's profile, not an update of the old one.
    retrained = catalogue_of(entry)
    try:
        assert retrained.manifest["parent"] is None and retrained.manifest["changed_since_training"] == 0
        assert retrained.manifest["profile"] == "exact"
    finally:
        retrained.close()
    # The same weights re-embedded every item from the folder: the vectors match the ones kept before.
    ids = sorted(items)
    assert np.allclose(vectors_of(entry, ids), vectors_of(removed, ids), atol=1e-4)

    clash = tmp_path / "clash" / "bags"  # bags-00 is out of the catalogue, but its photo is still in the folder
    clash.mkdir(parents=True)
    (clash / "bags-00.png").write_bytes(encode(product_photo("bags", seed=10)))  # another photo, the same name
    with pytest.raises(SystemExit, match="different file is already in the catalogue image folder"):
        update_catalogue([*common, "--add", str(clash.parent)])
    assert (catalogue / "bags" / "bags-00.png").read_bytes() == (photo_dir / "bags" / "bags-00.png").read_bytes()


def test_archive_options_are_remembered_but_not_one_versions_catalogue_folder():
    given = ["--batch-size", "8", "--catalogue-dir", "shop-v3", "--max-batch-delay", "20", "--catalogue-dir=shop-v4"]
    assert remembered(given) == ["--batch-size", "8", "--max-batch-delay", "20"]


def test_add_without_a_catalogue_image_folder_says_what_to_pass(bundle_dir, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "image_root": None}))  # a bundle that has none
    common = ["--name", "no-folder", "--model-store", str(tmp_path / "store"), *ARCHIVE_OPTIONS]
    with pytest.raises(SystemExit, match="--add needs the catalogue image folder.*pass --data-dir"):
        update_catalogue([*common, "--bundle", str(bundle), "--add", str(new_photos(tmp_path / "n", "n", 1))])
    assert not (tmp_path / "store").exists()  # refused before anything was packed or recorded


def test_every_version_answers_with_the_lines_live_listings(server, client, versions):
    """Each version searches its own sealed catalogue plus the line's change log, which next_version writes first:
    v1 and v2 both answer with the listings live now (v3's), each under its own version number."""
    live = versions["catalogues"]["3.0"]
    assert versions["catalogues"]["1.0"] != live and versions["catalogues"]["2.0"] != live  # older sealed catalogues
    assert client.register(f"{MODEL}-v2.mar", workers=1) == (MODEL, "2.0")
    assert client.default_version(MODEL) == "1.0"  # registering does not switch

    by_default, by_v2 = ask(server, k=len(live)), ask(server, "2.0", k=len(live))
    assert by_default.status_code == 200 and by_v2.status_code == 200, (by_default.text, by_v2.text)
    assert by_default.json()["model_version"] == "1.0" and by_v2.json()["model_version"] == "2.0"
    assert {n["id"] for n in by_default.json()["neighbours"]} == live
    assert {n["id"] for n in by_v2.json()["neighbours"]} == live
    assert ask(server, k=len(live) + 1).status_code == 400  # k is at most every live listing

    assert client.set_default(MODEL, "2.0") == "1.0"
    answer = ask(server, k=len(live)).json()
    assert answer["model_version"] == "2.0" and {n["id"] for n in answer["neighbours"]} == live
    assert client.rollback(MODEL) == ("2.0", "1.0")
    assert ask(server).json()["model_version"] == "1.0"
    client.unregister(MODEL, "2.0")
    assert [v["modelVersion"] for v in client.versions(MODEL)] == ["1.0"]


def test_rollout_rollback_and_scaling_under_load_fail_no_request(server, versions, capsys):
    """Three clients post continuously while the tool registers v2, makes it the default, scales it up, rolls
    back to v1, scales v2 down and unregisters it. Every request must succeed, and every answer must come from v1 or v2,
    with neighbours among the line's live listings."""
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
    for _, _, ids, _ in results:
        assert ids <= versions["catalogues"]["3.0"] and len(ids) == k
    print(f"\nsteps done at (elapsed/requests so far): {', '.join(timeline)}\n{load.summary()}")


def test_removed_ids_never_come_back(server, client, versions):
    """v3 removed REMOVED; v1's sealed catalogue still holds bags-00. Through TorchServe, v1 (the default, an older
    version) and v3, asked with a removed item's own photo and k = every live listing, and by the removed listing
    id, never answer it; then v3 made the default and rolled back under a steady load that sends that photo, with
    no failed request and no answer of either version that holds a removed id."""
    live, v1_sealed = versions["catalogues"]["3.0"], versions["catalogues"]["1.0"]
    assert "bags-00" in v1_sealed and not set(REMOVED) & live
    photos = {i: (versions["catalogue"] / versions["items"]["2.0"][i].image).read_bytes() for i in REMOVED}
    assert client.register(f"{MODEL}-v3.mar", workers=1) == (MODEL, "3.0")
    load = None
    try:
        for version in ("1.0", "3.0"):
            listing_url = f"{server.urls['inference']}/predictions/{MODEL}/{version}"
            for item_id, photo in photos.items():
                ids = neighbour_ids(ask(server, version, k=len(live), photo=photo))
                assert len(ids) == len(live) and set(ids) == live and item_id not in ids
                assert ask(server, version, k=len(live) + 1, photo=photo).status_code == 400  # at most every live one
                by_listing = requests.post(listing_url, json={"listing": item_id, "k": 4}, headers=server.headers(),
                                           timeout=60)
                assert by_listing.status_code == 404 and item_id in by_listing.json()["error"], by_listing.text
            kept = sorted(live & v1_sealed)[0]
            by_listing = requests.post(listing_url, json={"listing": kept, "k": len(live) - 1},
                                       headers=server.headers(), timeout=60)
            assert set(neighbour_ids(by_listing)) == live - {kept}

        k = len(live)
        load = SteadyLoad(f"{server.urls['inference']}/predictions/{MODEL}", {**server.headers(), "X-Top-K": str(k)},
                          photos["bags-00"], clients=2, max_seconds=120).start()
        assert load.wait_for("1.0"), load.summary()
        cli(server, "set-default", MODEL, "3.0")
        assert load.wait_for("3.0"), load.summary()
        cli(server, "rollback", MODEL)
        assert load.wait_for("1.0"), load.summary()
    finally:
        results = load.stop() if load else []
        if client.default_version(MODEL) != "1.0":
            client.set_default(MODEL, "1.0")
        client.unregister(MODEL, "3.0")
    failures = [r for r in results if r[0] != 200]
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:5]}"
    answers = {version: [ids for status, v, ids, _ in results if v == version] for version in ("1.0", "3.0")}
    assert answers["3.0"] and answers["1.0"] and {r[1] for r in results} == {"1.0", "3.0"}
    assert all(ids == live for ids in answers["3.0"] + answers["1.0"])  # k = every live listing, none removed


def test_outside_catalogue_updated_beside_it_and_served(server, client, versions, trained_run, photo_dir,
                                                        tmp_path_factory):
    """A bundle whose catalogue (an IVF profile) lives outside it: --add/--remove writes the next catalogue beside
    the old one, outside again and not in the archive, with the old quantizer and codes' training kept; TorchServe
    serves it from there without the removed ids; --checkpoint publishes a fresh one beside them."""
    root = tmp_path_factory.mktemp("outside")
    images, name, store = root / "images", "outside-search", versions["store"]
    shutil.copytree(photo_dir, images)
    build_index(["--checkpoint", str(trained_run / "last.pt"), "--data-dir", str(images), "--out-dir",
                 str(root / "bundle"), "--all", "--workers", "0", "--batch-size", "8", "--profile", "accurate",
                 "--runtime", "torch-fp32",
                 "--catalogue-dir", str(root / "catalogues" / "shop-v1")])
    common = ["--name", name, "--model-store", str(store), "--embed-batch-size", "8", *ARCHIVE_OPTIONS]
    v1 = update_catalogue([*common, "--bundle", str(root / "bundle")])  # the image folder: the bundle's image_root
    removed = ["phones-01", "shoes-02"]
    v2 = update_catalogue([*common, "--add", str(new_photos(root / "new", "out", 7200)), "--remove", *removed])

    assert not v1["bundled"] and v1["catalogue_dir"] == str((root / "catalogues" / "shop-v1").resolve())
    assert not v2["bundled"] and v2["catalogue_dir"] == str((root / "catalogues" / f"{name}-v2").resolve())
    assert Path(v2["bundle"]) == (root / f"{name}-v2").resolve() and not (root / f"{name}-v2" / "catalogue").exists()
    assert v2["data_dir"] == str(images.resolve()) and (images / "bags" / "out-bags.png").is_file()
    with zipfile.ZipFile(store / v2["archive"]) as archive:
        assert not [n for n in archive.namelist() if n.endswith(("index.faiss", "items.sqlite", "catalogue.json"))]
    ids = set(items_of(v2))
    assert ids == (set(items_of(v1)) | {f"out-{c}" for c in CATEGORIES}) - set(removed) and v2["items"] == len(ids)
    old, new = catalogue_of(v1), catalogue_of(v2)
    try:
        assert new.manifest["profile"] == "accurate" and new.manifest["factory"].startswith("IVF")
        assert new.manifest["parent"]["uid"] == old.uid and new.manifest["changed_since_training"] == 3 + 2
        assert new.manifest["training"] == old.manifest["training"]
    finally:
        old.close()
        new.close()
    indexes = [open_index(Path(v["catalogue_dir"]) / "index.faiss") for v in (v1, v2)]  # kept: ivf_of borrows
    before, after = (ivf_of(index) for index in indexes)
    assert np.array_equal(faiss.vector_to_array(before.sq.trained), faiss.vector_to_array(after.sq.trained))
    assert np.array_equal(before.quantizer.reconstruct_n(0, before.nlist),
                          after.quantizer.reconstruct_n(0, after.nlist))
    assert (before.ntotal, after.ntotal) == (len(ids) - 3 + 2, len(ids))

    assert client.register(v2["archive"], workers=1) == (name, "2.0")
    try:
        for item_id, image in (("phones-01", "phones/phones-01.jpg"), ("shoes-02", "shoes/shoes-02.png")):
            answer = neighbour_ids(ask(server, k=len(ids), photo=(images / image).read_bytes(), model=name))
            assert set(answer) == ids and len(answer) == len(ids) and item_id not in answer
    finally:  # its only version, so the default: the tool refuses that, TorchServe does not
        client.call("DELETE", f"/models/{name}/2.0")

    v3 = update_catalogue([*common, "--checkpoint", str(trained_run / "last.pt")])
    assert not v3["bundled"] and v3["catalogue_dir"] == str((root / "catalogues" / f"{name}-v3").resolve())
    fresh = catalogue_of(v3)
    try:
        assert fresh.manifest["profile"] == "accurate" and fresh.manifest["parent"] is None
        assert fresh.manifest["changed_since_training"] == 0 and set(items_of(v3)) == ids
    finally:
        fresh.close()
    assert np.allclose(vectors_of(v3, sorted(ids)), vectors_of(v2, sorted(ids)), atol=1e-4)


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
