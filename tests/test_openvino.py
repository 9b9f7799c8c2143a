"""The OpenVINO engine on the CPU, for real: bundles built by training.build_index behind the parity gate (the IR
converted, int8 calibrated by NNCF), served by a real TorchServe beside the torch engine; a catalogue of another
runtime refused at load; a broken calibration refused by the gate. The model is the session's tiny trained one with
its batch-norm statistics taken afresh (two epochs leave them unconverged: activations of 1e5 and more)."""
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from serving.build_archive import main as build_archive
from serving.management_client import ManagementClient, ManagementError
from serving.torchserve import ROOT
from serving.version_record import read_record
from tests.fixtures import running_torchserve, write_photo_folder
from tests.harness import recalibrated
from training.build_index import EMBEDDINGS_FILE
from training.build_index import main as build_index
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.optimize import Ir, calibration_tensors, quantize
from training.parity_gate import FASTEST_FIRST, MAX_DROP, GateSample, QualityDropError, Runtimes, choose
from visual_search import openvino_engine
from visual_search.bundle import load_bundle
from visual_search.catalogue import read_manifest
from visual_search.catalogue.build import update_catalogue
from visual_search.errors import BundleError, CatalogueError
from visual_search.fileio import sha256_file
from visual_search.items import Item, scan_folder, write_csv
from visual_search.preprocessing import IMAGENET_MEAN
from visual_search.runtime import Runtime
from visual_search.runtime_settings import RuntimeSettings, check_catalogue_runtime

BUILT = ("torch-fp32", "openvino-fp32", "openvino-bf16", "auto")  # auto: the default, the fastest that passes
CATALOGUE_PER_CATEGORY = 20  # the other 10 photos of each category are the held-out queries
MISMATCHED = "ov-mismatched"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """90 photos: 60 in the catalogue, 30 held out as queries (the gate's and the served ones)."""
    root = tmp_path_factory.mktemp("ov-photos")
    folder = write_photo_folder(root / "photos", per_category=30)
    items = scan_folder(folder)
    catalogue = [it for it in items if int(it.id.rsplit("-", 1)[1]) < CATALOGUE_PER_CATEGORY]
    queries = [it for it in items if int(it.id.rsplit("-", 1)[1]) >= CATALOGUE_PER_CATEGORY]
    write_csv(catalogue, root / "catalogue.csv")
    write_csv(queries, root / "queries.csv")
    blank = root / "blank"  # a calibration set of blank images, the mean colour: a broken calibration
    (blank / "bags").mkdir(parents=True)
    grey = tuple(round(255 * m) for m in IMAGENET_MEAN)
    for i in range(12):
        Image.new("RGB", (64, 48), grey).save(blank / "bags" / f"blank-{i:02d}.png")
    write_csv([Item(it.id, it.category, str(blank / it.image)) for it in scan_folder(blank)], root / "blank.csv")
    return {"root": root, "folder": folder, "catalogue": catalogue, "queries": queries}


@pytest.fixture(scope="module")
def checkpoint(trained_run, photos):
    state = load_checkpoint(trained_run / "last.pt")
    model, categories, preprocess = model_from_checkpoint(state)
    recalibrated(model, preprocess, [(photos["folder"] / it.image).read_bytes() for it in photos["catalogue"]])
    path = photos["root"] / "recalibrated.pt"
    torch.save({**state, "model": model.state_dict()}, path)
    return path


def build(checkpoint, photos, out, runtime, *extra):
    return build_index(["--checkpoint", str(checkpoint), "--data-dir", str(photos["folder"]),
                        "--out-dir", str(out), "--catalogue", str(photos["root"] / "catalogue.csv"), "--queries",
                        str(photos["root"] / "queries.csv"), "--runtime", runtime, "--workers", "0",
                        "--batch-size", "16", *extra])


@pytest.fixture(scope="module")
def bundles(checkpoint, photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("ov-bundles")
    for runtime in BUILT:
        build(checkpoint, photos, root / runtime, runtime)
    return {runtime: root / runtime for runtime in BUILT}


@pytest.fixture(scope="module")
def blank_calibrated(checkpoint, photos, tmp_path_factory):
    """An int8 bundle calibrated on blank images, built only because the drop was accepted."""
    out = tmp_path_factory.mktemp("ov-blank") / "bundle"
    build(checkpoint, photos, out, "openvino-int8", "--calibration", str(photos["root"] / "blank.csv"),
          "--accept-quality-drop")
    return out


def manifest_of(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def test_each_bundle_carries_the_ir_of_its_runtime_with_its_checksums(bundles):
    assert manifest_of(bundles["torch-fp32"])["openvino"] is None
    assert not (bundles["torch-fp32"] / "model.xml").exists()
    for runtime in ("openvino-fp32", "openvino-bf16", "auto"):
        manifest = manifest_of(bundles[runtime])
        section = manifest["openvino"]
        assert set(section["files"]) == {"model.xml", "model.bin"}
        for name, digest in section["files"].items():
            assert sha256_file(bundles[runtime] / name) == digest
        settings = RuntimeSettings.from_dict(manifest["runtime"])
        assert settings.engine == "openvino" and section["precision"] == ("int8" if settings.precision == "int8"
                                                                          else "fp32")
        catalogue = read_manifest(bundles[runtime] / "catalogue")
        assert {k: catalogue["runtime"][k] for k in ("engine", "precision")} == settings.record()


def test_the_gate_records_both_figures_and_auto_takes_the_fastest_runtime_that_passes(bundles):
    parity = manifest_of(bundles["auto"])["parity"]
    tried = [t["runtime"] for t in parity["tried"]]
    supported = [n for n in FASTEST_FIRST if openvino_engine.cpu_supports(RuntimeSettings.named(n).precision)]
    assert tried == [*supported, "torch-fp32"][:len(tried)]
    assert [t["passed"] for t in parity["tried"]] == [False] * (len(tried) - 1) + [True]
    assert parity["runtime"] == tried[-1] == RuntimeSettings.from_dict(manifest_of(bundles["auto"])["runtime"]).name
    assert parity["queries"] == 30 and parity["catalogue_items"] == 60 and parity["queries_from"] == "held-out photos"
    for result in parity["tried"]:
        if result["runtime"] != "torch-fp32":
            assert result["drop"] == pytest.approx(result["fp32_precision_at_4"] - result["precision_at_4"], abs=1e-3)
            assert result["passed"] == (result["drop"] <= MAX_DROP)
            assert 0 <= result["recall_at_10_vs_fp32"] <= 1 and 0 <= result["accuracy"] <= 1
    fp32 = manifest_of(bundles["openvino-fp32"])["parity"]["tried"][0]
    assert fp32["drop"] == 0 and fp32["recall_at_10_vs_fp32"] == 1.0  # the conversion keeps fp32's neighbours
    assert manifest_of(bundles["torch-fp32"])["parity"]["tried"] == [
        {"runtime": "torch-fp32", "passed": True, "note": "the reference itself: no gate"}]


def test_a_blank_calibration_is_refused_by_the_gate_and_nothing_is_written(checkpoint, photos, tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(QualityDropError, match=r"parity gate: openvino-int8 reaches precision@4 .* a drop of .*"
                                               r"more than 0.01.*--accept-quality-drop"):
        build(checkpoint, photos, out, "openvino-int8", "--calibration", str(photos["root"] / "blank.csv"))
    assert not (out / "manifest.json").exists() and not (out / "catalogue").exists()


def test_a_calibration_at_the_wrong_scale_is_refused_by_the_gate(checkpoint, photos):
    """Calibration tensors of 0-255 pixel values, not the preprocessing's normalised ones: ranges 255 times too
    wide, which leave int8 a level or two for the real activations."""
    model, categories, preprocess = model_from_checkpoint(load_checkpoint(checkpoint))
    runtimes = Runtimes(model, preprocess, True, photos["folder"], photos["catalogue"], categories)
    tensors = calibration_tensors(photos["folder"], photos["catalogue"], preprocess, categories)
    runtimes.irs["int8"] = Ir(quantize(runtimes.ir("fp32").model, [t * 255 for t in tensors]), "int8")
    sample = GateSample.draw(photos["folder"], photos["catalogue"], photos["queries"], categories)
    with pytest.raises(QualityDropError, match=r"parity gate: openvino-int8 reaches precision@4 0\.[0-7]"):
        choose("openvino-int8", ["openvino-int8"], runtimes, sample)


def test_an_accepted_drop_is_recorded(blank_calibrated):
    result = manifest_of(blank_calibrated)["parity"]["tried"][0]
    assert result["runtime"] == "openvino-int8" and result["accepted"] and result["drop"] > MAX_DROP
    assert manifest_of(blank_calibrated)["openvino"]["calibration"]["photos"] == 12


def test_a_changed_ir_file_is_refused_at_load(bundles, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundles["openvino-bf16"], copy)
    with open(copy / "model.bin", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="model.bin does not match the checksum in manifest.json"):
        load_bundle(copy)
    (copy / "model.xml").unlink()
    with pytest.raises(BundleError, match="lacks model.xml, the OpenVINO IR its manifest lists"):
        load_bundle(copy)


def test_a_manifest_without_an_engine_loads_as_the_torch_engine(bundle_dir, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    manifest = manifest_of(copy)
    manifest["runtime"] = {"precision": "fp32", "channels_last": False, "compile": False, "gpu_decode": False}
    for key in ("openvino", "parity"):
        manifest.pop(key)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert load_bundle(copy).runtime == RuntimeSettings(engine="torch", precision="fp32")


@pytest.mark.parametrize("values,message", [
    ({"engine": "onnx"}, "engine must be one of torch, openvino"),
    ({"engine": "openvino", "precision": "fp16"}, "precision of the openvino engine must be one of fp32, bf16, int8"),
    ({"engine": "torch", "precision": "int8"}, "precision of the torch engine must be one of fp32, fp16, bf16"),
    ({"engine": "openvino", "compile": True}, "compile is a setting of the torch engine"),
    ({"engine": "openvino", "threads": 2}, "unknown runtime settings"),
])
def test_the_runtime_section_is_validated(values, message):
    with pytest.raises(ValueError, match=message):
        RuntimeSettings.from_dict(values)


def test_openvino_archives_fall_back_to_torch_fp32_on_cuda_with_a_reason():
    applied, dropped = RuntimeSettings(engine="openvino", precision="int8").for_device("cuda:0")
    assert applied == RuntimeSettings() and "OpenVINO serves on the CPU" in dropped["engine"]
    assert RuntimeSettings(engine="openvino", precision="bf16").for_device("cpu")[0].precision == (
        "bf16" if openvino_engine.cpu_supports("bf16") else "fp32")


# ------------------------------------------------------------------------------------------------- served

@pytest.fixture(scope="module")
def store(bundles, blank_calibrated, tmp_path_factory):
    store = tmp_path_factory.mktemp("ov-store")
    for runtime in BUILT:
        build_archive(["--bundle", str(bundles[runtime]), "--name", f"ov-{runtime}", "--model-store", str(store),
                       "--batch-size", "4", "--max-batch-delay", "50", "--startup-timeout", "120"])
    # An int8 archive whose runtime section was changed to torch after packing: model.pt would embed the queries,
    # but its catalogue holds int8 vectors of a blank calibration (the packing tool refuses to write such a pair).
    build_archive(["--bundle", str(blank_calibrated), "--name", MISMATCHED, "--model-store", str(store)])
    archive = store / f"{MISMATCHED}.mar"
    with zipfile.ZipFile(archive) as mar:
        entries = {name: mar.read(name) for name in mar.namelist()}
    manifest = json.loads(entries["manifest.json"])
    manifest["runtime"] = RuntimeSettings().to_dict()
    entries["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(archive, "w") as mar:
        for name, data in entries.items():
            mar.writestr(name, data)
    return store


@pytest.fixture(scope="module")
def served(store, tmp_path_factory):
    with running_torchserve(tmp_path_factory.mktemp("ov-ts"), store, [f"ov-{r}.mar" for r in BUILT]) as server:
        yield server


def ask(server, model, body, output="similar"):
    import requests

    response = requests.post(f"{server.urls['inference']}/predictions/{model}", data=body, timeout=120,
                             headers={**server.headers(), "Content-Type": "image/png", "X-Output": output})
    assert response.status_code == 200, response.text
    return response.json()


def test_served_openvino_fp32_finds_the_torch_engine_s_neighbours(served, photos):
    for item in photos["queries"]:
        body = (photos["folder"] / item.image).read_bytes()
        torch_answer, ov_answer = ask(served, "ov-torch-fp32", body), ask(served, "ov-openvino-fp32", body)
        assert [n["id"] for n in ov_answer["neighbours"]] == [n["id"] for n in torch_answer["neighbours"]], item
        assert np.allclose([n["distance"] for n in ov_answer["neighbours"]],
                           [n["distance"] for n in torch_answer["neighbours"]], atol=1e-4)
        assert ov_answer["category"] == torch_answer["category"]
        assert ov_answer["confidence"] == pytest.approx(torch_answer["confidence"], abs=1e-4)
    body = (photos["folder"] / photos["queries"][0].image).read_bytes()
    ov_vector = np.array(ask(served, "ov-openvino-fp32", body, "embedding")["embedding"])
    torch_vector = np.array(ask(served, "ov-torch-fp32", body, "embedding")["embedding"])
    assert float(ov_vector @ torch_vector) > 0.9999


def served_precision(server, model, photos):
    hits = []
    for item in photos["queries"]:
        answer = ask(server, model, (photos["folder"] / item.image).read_bytes())
        hits.extend(n["category"] == item.category for n in answer["neighbours"])
    return float(np.mean(hits))


@pytest.mark.parametrize("runtime", ["openvino-bf16", "auto"])
def test_served_fast_precisions_keep_precision_at_4_within_the_gate(served, photos, bundles, runtime):
    reference = served_precision(served, "ov-torch-fp32", photos)
    fast = served_precision(served, f"ov-{runtime}", photos)
    assert reference - fast <= MAX_DROP, (reference, fast)
    gate = manifest_of(bundles[runtime])["parity"]["tried"][-1]
    assert gate["fp32_precision_at_4"] == pytest.approx(reference, abs=1e-3)  # the gate measured what is served
    assert gate["precision_at_4"] == pytest.approx(fast, abs=2 / 120 + 1e-3)


def test_a_catalogue_of_another_runtime_is_refused_at_load_by_the_real_torchserve(served):
    log = served.state_dir / "logs" / "model_log.log"
    since = log.stat().st_size
    client = ManagementClient.from_state(served.state_dir, timeout=120)
    with pytest.raises(ManagementError, match=f"Failed to start workers for model {MISMATCHED}") as refused:
        client.register(f"{MISMATCHED}.mar", workers=1, ready_timeout=60)
    text = log.read_bytes()[since:].decode(errors="replace")
    reason = "was embedded by openvino-int8, but this worker embeds queries with torch-fp32"
    assert reason in text and reason in str(refused.value), (str(refused.value), text[-3000:])
    assert MISMATCHED not in client.model_names()


def test_packing_refuses_a_runtime_the_catalogue_does_not_fit_and_takes_one_measured_compatible(
        blank_calibrated, bundles, tmp_path):
    with pytest.raises(SystemExit, match="embedded by openvino-int8, but this archive embeds queries with "
                                         "torch-fp32.*compatible query runtimes: none"):
        build_archive(["--bundle", str(blank_calibrated), "--name", "x", "--model-store", str(tmp_path),
                       "--engine", "torch"])
    with pytest.raises(SystemExit, match="the IR is fp32"):
        build_archive(["--bundle", str(bundles["openvino-bf16"]), "--name", "x", "--model-store", str(tmp_path),
                       "--precision", "int8"])
    # openvino fp32 vectors are torch fp32's: the gate recorded the pair, and model.pt may serve the catalogue
    compatible = read_manifest(bundles["openvino-fp32"] / "catalogue")["runtime"]["compatible"]
    assert {"engine": "torch", "precision": "fp32"} in [{k: p[k] for k in ("engine", "precision")}
                                                        for p in compatible]
    build_archive(["--bundle", str(bundles["openvino-fp32"]), "--name", "y", "--model-store", str(tmp_path),
                   "--engine", "torch"])
    with zipfile.ZipFile(tmp_path / "y.mar") as mar:
        assert json.loads(mar.read("manifest.json"))["runtime"]["engine"] == "torch"
    assert check_catalogue_runtime(read_manifest(bundles["openvino-fp32"] / "catalogue"), RuntimeSettings())


def test_rows_embedded_by_another_runtime_are_refused_by_a_catalogue_update(bundles, tmp_path):
    catalogue = bundles["openvino-bf16"] / "catalogue"
    vectors = np.load(bundles["openvino-bf16"] / EMBEDDINGS_FILE)[:2]
    new = [Item(f"new-{i}", "bags", "bags/new.png") for i in range(2)]
    with pytest.raises(CatalogueError, match="was embedded by openvino-bf16; the rows to add were embedded by "
                                             "torch-fp32"):
        update_catalogue(catalogue, tmp_path / "next", add_items=new, add_embeddings=vectors, progress=False)
    manifest = update_catalogue(catalogue, tmp_path / "next", add_items=new, add_embeddings=vectors, progress=False,
                                runtime={"engine": "openvino", "precision": "bf16"})
    assert manifest["runtime"] == read_manifest(catalogue)["runtime"]  # the update keeps the record


IMPORTS = """
import sys, zipfile
model_dir, root, archive = sys.argv[1:4]
sys.path[:0] = [model_dir, root]
import visual_search
from tests.harness import handle, load_handler
handler = load_handler(archive, sys.argv[4], 2)
assert visual_search.__file__.startswith(model_dir), visual_search.__file__
print(handler.service.runtime.settings.name, len(handle(handler, [open(sys.argv[5], "rb").read()], ["similar"])))
print(sorted({name.split(".")[0] for name in sys.modules} & {"openvino", "nncf", "training", "serving"}))
"""


def test_an_openvino_worker_loads_openvino_and_no_training_code(store, tmp_path, photos):
    archive = store / "ov-auto.mar"
    model_dir = tmp_path / "model_dir"
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(model_dir)
    query = photos["folder"] / photos["queries"][0].image
    result = subprocess.run([sys.executable, "-c", IMPORTS, str(model_dir), str(ROOT), str(archive),
                             str(tmp_path / "work"), str(query)], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    name_line, modules = result.stdout.strip().splitlines()[-2:]
    assert name_line.startswith("openvino-") and name_line.endswith(" 1")
    assert modules == "['openvino']", modules
    assert Path(model_dir / "visual_search" / "openvino_engine.py").is_file()


def test_next_versions_of_an_openvino_catalogue_keep_its_runtime(bundles, checkpoint, photos, tmp_path):
    """--add embeds the new photos with the catalogue's runtime and keeps its IR; --checkpoint makes the IR anew
    from the new weights behind the gate (on a catalogue sample: no held-out photos there)."""
    from training.next_version import main as next_version

    images = tmp_path / "images"
    shutil.copytree(photos["folder"], images)
    new = tmp_path / "new" / "bags"
    new.mkdir(parents=True)
    shutil.copy2(images / photos["queries"][0].image, new / "added-bag.png")
    common = ["--name", "ov-versions", "--model-store", str(tmp_path / "store"), "--data-dir", str(images)]
    source = manifest_of(bundles["openvino-bf16"])
    first = next_version([*common, "--bundle", str(bundles["openvino-bf16"])])
    added = next_version([*common, "--add", str(tmp_path / "new")])
    manifest = manifest_of(Path(added["bundle"]))
    assert manifest["openvino"]["files"] == source["openvino"]["files"] and manifest["runtime"] == source["runtime"]
    catalogue = load_bundle(Path(added["bundle"])).catalogue
    assert catalogue.manifest["runtime"] == read_manifest(Path(first["catalogue_dir"]))["runtime"]
    settings = RuntimeSettings.from_dict(manifest["runtime"])
    runtime = Runtime(load_bundle(Path(added["bundle"])), "cpu", settings)
    expected = runtime.embed(runtime.prepare([{"body": (new / "added-bag.png").read_bytes()}], [{}]).batch)[0][0]
    assert float(catalogue.vector("added-bag") @ expected) > 0.9999
    try:  # on a few catalogue photos the gate may pass or refuse; a refusal writes nothing
        retrained = next_version([*common, "--checkpoint", str(checkpoint)])
    except SystemExit as refused:
        assert "parity gate: openvino-bf16" in str(refused), refused
        assert [v["version"] for v in read_record(tmp_path / "store", "ov-versions")["versions"]] == ["1.0", "2.0"]
        retrained = next_version([*common, "--checkpoint", str(checkpoint), "--accept-quality-drop"])
    manifest = manifest_of(Path(retrained["bundle"]))
    tried = manifest["parity"]["tried"][0]
    assert manifest["parity"]["runtime"] == "openvino-bf16" and (tried["passed"] or tried.get("accepted"))
    assert manifest["parity"]["queries_from"].startswith("a catalogue sample")
    assert read_manifest(Path(retrained["catalogue_dir"]))["runtime"]["precision"] == "bf16"
