"""The manifests keep the pods closed while TorchServe's token authorization is off (deploy.validate's exposure
check, on the real manifests, on copies with a restriction taken away, and through its command line), and
deploy.make_release writes a release whole or not at all, with --threads in each archive's model-config.yaml."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from deploy import make_release as release_module
from deploy.make_release import main as make_release
from deploy.validate import exposure_problems, load_documents, manifest_files, read_config, token_authorization_off
from serving.torchserve import ROOT, tool
from visual_search import fileio
from visual_search.fileio import rename_noreplace as rename_without_replacing

TEMPLATE = ROOT / "deploy" / "storage" / "config" / "config.properties"
MODEL_CONFIG = {"batchSize": 2, "minWorkers": 1, "maxWorkers": 1,
                "handler": {"default_k": 4, "max_k": 100, "catalogue_dir": "shop-v1"}}


def build_archive(folder, name="tiny", version="1.0", config=MODEL_CONFIG, extra=b""):
    """A real archive from torch-model-archiver: a handler file, a filler file, weights and the manifest that names
    their sha256 (what make_release verifies), and (unless config is None) a model-config.yaml."""
    work = folder / f"src-{name}-{version}"
    work.mkdir(parents=True)
    (work / "handler.py").write_text("def handle(data, context):\n    return data\n")
    (work / "filler.txt").write_bytes(b"every worker of every version\n" * 200 + extra)
    (work / "model.pt").write_bytes(f"weights of {name} {version}".encode())
    (work / "manifest.json").write_text(json.dumps({"weights_sha256": fileio.sha256_file(work / "model.pt")}))
    files = ",".join(str(work / f) for f in ("filler.txt", "model.pt", "manifest.json"))
    command = [tool("torch-model-archiver"), "--model-name", name, "--version", version, "--handler",
               str(work / "handler.py"), "--extra-files", files, "--export-path", str(work)]
    if config is not None:
        (work / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        command += ["--config-file", str(work / "model-config.yaml")]
    subprocess.run(command, check=True, capture_output=True)
    archive = folder / f"{name}-v{version}.mar"
    shutil.move(work / f"{name}.mar", archive)
    return archive


def corrupt(archive, member="filler.txt"):
    """A copy of `archive` whose `member` no longer matches its CRC; its manifest still reads."""
    out = archive.with_name(f"corrupt-{archive.name}")
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(member)
    # the data follows the 30-byte local header, the name and the local header's own extra field
    extra = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + len(info.filename.encode()) + extra
    data[start + info.compress_size // 2] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


def entries(archive):
    with zipfile.ZipFile(archive) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def leftovers(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".partial" in p.name)


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archives")
    return {"v1": build_archive(folder, version="1.0"), "v2": build_archive(folder, version="2.0"),
            "no-config": build_archive(folder, name="bare", config=None)}


@pytest.fixture(scope="module")
def release(archives, tmp_path_factory):
    out = tmp_path_factory.mktemp("releases") / "release-1"
    make_release(["--out", str(out), str(archives["v1"]), str(archives["v2"]), "--default", "tiny=2.0"])
    return out


def shipped():
    return [doc for path in manifest_files() for doc in load_documents(path)]


def find(documents, kind, name="visual-search", canary=False):
    found = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name
             and (kind != "InferenceService" or ("canaryTrafficPercent" in d["spec"]["predictor"]) == canary)]
    assert len(found) == 1, (kind, name, canary)
    return found[0]


# -- closed by default -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["template", "release"])
def test_a_release_config_without_tokens_is_served_only_by_closed_manifests(which, release):
    """Where token authorization is off, in the template or in what make_release writes, the manifests must close
    every pod themselves."""
    config = TEMPLATE if which == "template" else release / "config" / "config.properties"
    props = read_config(config)
    assert exposure_problems(shipped(), props) == []
    if token_authorization_off(props, {}):
        assert exposure_problems(stripped(), props), "with tokens off, the manifests' restrictions are what count"


def without_label(key, canary=False):
    def change(docs):
        del find(docs, "InferenceService", canary=canary)["metadata"]["labels"][key]
    return change


def set_mode(mode, drop_label=None):
    def change(docs):
        meta = find(docs, "InferenceService")["metadata"]
        if mode is None:
            del meta["annotations"]["serving.kserve.io/deploymentMode"]
        else:
            meta["annotations"]["serving.kserve.io/deploymentMode"] = mode
        if drop_label:
            del meta["labels"][drop_label]
    return change


def without_policy(name):
    def change(docs):
        docs.remove(find(docs, "NetworkPolicy", name))
    return change


def edit_policy(name, edit):
    def change(docs):
        edit(find(docs, "NetworkPolicy", name)["spec"])
    return change


def first_rule_from(peers):
    def edit(spec):
        if peers is None:
            del spec["ingress"][0]["from"]
        else:
            spec["ingress"][0]["from"] = peers
    return edit


def service_type(kind):
    def change(docs):
        find(docs, "Service")["spec"]["type"] = kind
    return change


KSERVE, DEPLOYMENT = "InferenceService/visual-search", "Deployment/visual-search"


@pytest.mark.parametrize("change,who,count,expected", [
    (without_label("networking.knative.dev/visibility"), KSERVE, 1,
     "networking.knative.dev/visibility: cluster-local"),
    (without_label("networking.knative.dev/visibility", canary=True), KSERVE, 1, "not cluster-local"),
    (set_mode(None, drop_label="networking.kserve.io/visibility"), KSERVE, 1,
     "networking.kserve.io/visibility: cluster-local"),
    (set_mode("RawDeployment", drop_label="networking.kserve.io/visibility"), KSERVE, 1, "not cluster-local"),
    (set_mode("Knative", drop_label="networking.knative.dev/visibility"), KSERVE, 1, "not cluster-local"),
    (without_policy("visual-search-predictor"), KSERVE, 2, "no NetworkPolicy restricts ingress"),
    (without_policy("visual-search"), DEPLOYMENT, 1, "no NetworkPolicy restricts ingress"),
    (edit_policy("visual-search-predictor", lambda spec: spec.update(policyTypes=["Egress"])), KSERVE, 2,
     "no NetworkPolicy restricts ingress"),
    (edit_policy("visual-search-predictor", first_rule_from(None)), KSERVE, 2, "without `from`"),
    (edit_policy("visual-search", first_rule_from([])), DEPLOYMENT, 1, "without `from`"),
    (edit_policy("visual-search", first_rule_from([{"namespaceSelector": {}}])), DEPLOYMENT, 1,
     "every pod of every namespace"),
    (edit_policy("visual-search-predictor", first_rule_from([{"ipBlock": {"cidr": "0.0.0.0/0"}}])), KSERVE, 2,
     "0.0.0.0/0"),
    (edit_policy("visual-search", lambda spec: spec["ingress"].append({"ports": [{"port": 8082}]})), DEPLOYMENT,
     1, "without `from`"),
    # the Service's selector (the name label) matches KServe's pods as well, were they in the same namespace
    (service_type("LoadBalancer"), "", 3, "outside the cluster (type LoadBalancer)"),
    (service_type("NodePort"), "", 3, "outside the cluster (type NodePort)"),
])
def test_taking_a_restriction_away_is_reported_as_open(change, who, count, expected):
    documents = shipped()
    change(documents)
    found = exposure_problems(documents, read_config(TEMPLATE))
    assert len(found) == count and all(problem.startswith(who) for problem in found), found
    assert all(expected in problem for problem in found), found


def test_the_kserve_label_is_not_needed_where_the_mode_is_serverless():
    documents = shipped()
    for doc in documents:
        if doc["kind"] == "InferenceService":
            assert doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
            del doc["metadata"]["labels"]["networking.kserve.io/visibility"]
    assert exposure_problems(documents, read_config(TEMPLATE)) == []


def stripped():
    """The manifests with every restriction taken away: no NetworkPolicy, no visibility label."""
    documents = [doc for doc in shipped() if doc["kind"] != "NetworkPolicy"]
    for doc in documents:
        for key in ("networking.knative.dev/visibility", "networking.kserve.io/visibility"):
            doc["metadata"].get("labels", {}).pop(key, None)
    return documents


def test_with_tokens_on_no_restriction_is_required_but_a_token_flag_on_the_command_line_counts():
    props = {**read_config(TEMPLATE), "disable_token_authorization": "false"}
    documents = stripped()
    assert exposure_problems(documents, props) == []
    find(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"].append("--disable-token-auth")
    found = exposure_problems(documents, props)
    assert found and all(problem.startswith(DEPLOYMENT) for problem in found), found
    env_off = {**props, "enable_envvars_config": "true"}
    documents = stripped()
    find(documents, "InferenceService")["spec"]["predictor"]["model"]["env"].append(
        {"name": "TS_DISABLE_TOKEN_AUTHORIZATION", "value": "true"})
    assert [p for p in exposure_problems(documents, env_off) if p.startswith(KSERVE)]


def test_the_validator_cli_passes_a_release_config_and_fails_an_open_manifest_set(release, tmp_path):
    config = release / "config" / "config.properties"
    result = subprocess.run([sys.executable, "-m", "deploy.validate", "--config", str(config)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("\nclosed ") == 3 and f"pods reading {config}" in result.stdout

    # the same set without the KServe NetworkPolicy: each InferenceService is reported open, the rest stays ok
    files = [p for p in manifest_files() if p.name != "networkpolicy.yaml" or p.parent.name != "kserve"]
    assert len(files) == len(manifest_files()) - 1
    result = subprocess.run([sys.executable, "-m", "deploy.validate", "--config", str(config), *map(str, files)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1, result.stdout
    opened = [line for line in result.stdout.splitlines() if line.startswith("open ")]
    assert len(opened) == 2 and all("InferenceService/visual-search" in line for line in opened), result.stdout
    assert "no NetworkPolicy restricts ingress to its pods" in result.stdout
    assert "invalid" not in result.stdout


# -- make_release ------------------------------------------------------------------------------------------------

def test_without_threads_the_archives_are_copied_byte_for_byte(archives, release):
    for name in ("v1", "v2"):
        copied = release / "model-store" / archives[name].name
        assert copied.read_bytes() == archives[name].read_bytes()
        assert copied.stat().st_mode == archives[name].stat().st_mode
    assert leftovers(release.parent) == []
    snapshot = json.loads(read_config(release / "config" / "config.properties")["model_snapshot"])
    assert snapshot["models"]["tiny"]["2.0"]["defaultVersion"] is True


def test_threads_are_written_into_each_archive_s_model_config(archives, tmp_path):
    out = tmp_path / "new" / "release-2"
    make_release(["--out", str(out), str(archives["v1"]), str(archives["v2"]), "--default", "tiny=1.0",
                  "--threads", "3"])
    for name in ("v1", "v2"):
        original, written = entries(archives[name]), entries(out / "model-store" / archives[name].name)
        config_file = json.loads(written["MAR-INF/MANIFEST.json"])["model"]["configFile"]
        assert config_file == "model-config.yaml"
        config = yaml.safe_load(written[config_file])
        assert config == {**MODEL_CONFIG, "handler": {**MODEL_CONFIG["handler"], "threads": 3}}
        assert {k: v for k, v in written.items() if k != config_file} == \
            {k: v for k, v in original.items() if k != config_file}
        with zipfile.ZipFile(out / "model-store" / archives[name].name) as zf, \
                zipfile.ZipFile(archives[name]) as source:
            assert zf.testzip() is None
            assert [(i.filename, i.compress_type, i.date_time) for i in zf.infolist()] == \
                [(i.filename, i.compress_type, i.date_time) for i in source.infolist()]
        assert (out / "model-store" / archives[name].name).stat().st_mode & 0o044 == 0o044, "readable by the pods"
    assert leftovers(tmp_path) == []


def test_threads_need_an_archive_with_a_model_config_and_nothing_is_written(archives, tmp_path):
    out = tmp_path / "new" / "release"
    with pytest.raises(SystemExit) as exit_:
        make_release(["--out", str(out), str(archives["v1"]), str(archives["no-config"]), "--threads", "2"])
    assert "has no model-config.yaml" in str(exit_.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("threads", ["0", "-1", "two"])
def test_threads_must_be_a_positive_whole_number(archives, tmp_path, threads):
    with pytest.raises(SystemExit):
        make_release(["--out", str(tmp_path / "r"), str(archives["v1"]), "--threads", threads])
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_fails_halfway_leaves_nothing_behind(archives, tmp_path):
    """The second archive is damaged after its manifest: the first is already written when the copy fails."""
    bad = corrupt(build_archive(tmp_path / "archives", name="other"))
    (tmp_path / "releases").mkdir()
    out = tmp_path / "releases" / "a" / "b" / "release-3"
    with pytest.raises(SystemExit) as exit_:
        make_release(["--out", str(out), str(archives["v1"]), str(bad), "--threads", "2"])
    assert str(bad) in str(exit_.value)
    assert list((tmp_path / "releases").iterdir()) == [], "no release, no staging folder, no parent created"


def test_an_existing_folder_is_never_changed(archives, tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    with pytest.raises(SystemExit) as exit_:
        make_release(["--out", str(out), str(archives["v1"])])
    assert "never changed" in str(exit_.value)
    assert list(out.iterdir()) == [] and list(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize("renameat2", ["system", "absent"])
def test_renaming_into_place_never_replaces_a_file_or_a_folder(tmp_path, monkeypatch, renameat2):
    if renameat2 == "absent":
        monkeypatch.setattr(fileio, "_renameat2", None)
    (tmp_path / "new").write_text("new")
    (tmp_path / "old").write_text("old")
    with pytest.raises(FileExistsError):
        rename_without_replacing(tmp_path / "new", tmp_path / "old")
    assert (tmp_path / "old").read_text() == "old" and (tmp_path / "new").read_text() == "new"
    (tmp_path / "folder-new").mkdir()
    (tmp_path / "folder-old").mkdir()
    with pytest.raises(FileExistsError):
        rename_without_replacing(tmp_path / "folder-new", tmp_path / "folder-old")
    rename_without_replacing(tmp_path / "new", tmp_path / "placed")
    rename_without_replacing(tmp_path / "folder-new", tmp_path / "folder-placed")
    assert (tmp_path / "placed").read_text() == "new" and not (tmp_path / "new").exists()
    assert (tmp_path / "folder-placed").is_dir() and not (tmp_path / "folder-new").exists()


def test_each_file_is_synced_before_it_is_renamed_and_each_folder_after(archives, tmp_path, monkeypatch):
    """The order of the durable steps: fsync a file, rename it into place, fsync its folder; the release folder
    is renamed last and its parent synced after it."""
    steps = []
    real_fsync, real_rename = os.fsync, fileio.rename_noreplace
    monkeypatch.setattr(release_module.os, "fsync", lambda fd: (steps.append(("fsync", os.readlink(
        f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(fileio, "rename_noreplace",
                        lambda a, b: (steps.append(("rename", str(b))), real_rename(a, b))[1])
    out = tmp_path / "release"
    make_release(["--out", str(out), str(archives["v1"]), "--threads", "2"])
    assert steps[-2:] == [("rename", str(out)), ("fsync", str(tmp_path))]
    renames = [i for i, step in enumerate(steps) if step[0] == "rename"]
    assert len(renames) == 3  # the archive, the config, the release folder
    for i in renames[:-1]:
        partial, target = steps[i - 1][1], steps[i][1]
        assert steps[i - 1][0] == "fsync" and ".partial" in Path(partial).name
        assert Path(partial).parent == Path(target).parent
        assert steps[i + 1] == ("fsync", str(Path(target).parent))
