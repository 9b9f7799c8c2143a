"""What the image and the Kubernetes pods rely on, on a real TorchServe: a release laid out by deploy.make_release
and started the way the manifests start it (no token, the version the release names as default), the image's
health check (token on, key renewal), and serving.serve's choice of version."""
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from deploy.make_release import main as make_release
from serving.build_archive import main as build_archive
from serving.serve import MODELS_ENV, NoVersionChosen, models_from_env, startup_models
from serving.serve import main as serve_main
from serving.torchserve import ADDRESS_KEYS, ROOT, free_port, java_home, tool
from tests.conftest import MODEL_NAME
from tests.fixtures import encode, product_photo, running_torchserve

HEALTHCHECK = ROOT / "deploy" / "container" / "healthcheck.py"
PHOTO = encode(product_photo("shoes", seed=5))


@pytest.fixture(scope="module")
def versioned_store(bundle_dir, tmp_path_factory):
    """A model store with versions 1.0 and 2.0 of the tiny model, as serving.manage's rollouts leave it."""
    store = tmp_path_factory.mktemp("versioned_store")
    for version in ("1", "2"):
        build_archive(["--bundle", str(bundle_dir), "--name", MODEL_NAME, "--version", f"{version}.0",
                       "--out-name", f"{MODEL_NAME}-v{version}", "--model-store", str(store),
                       "--batch-size", "2", "--max-batch-delay", "20", "--startup-timeout", "120"])
    return store


def archive(store, version):
    return str(store / f"{MODEL_NAME}-v{version}.mar")


def predict(url, version=None, headers=None):
    path = f"{url}/predictions/{MODEL_NAME}" + (f"/{version}" if version else "")
    response = requests.post(path, data=PHOTO, headers={"Content-Type": "image/png", **(headers or {})}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def healthcheck(*args):
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=60)


# -- a release as Kubernetes serves it ---------------------------------------------------------------------------

@contextmanager
def torchserve_as_in_the_pods(release, state, timeout=240):
    """`torchserve --start --ncs --ts-config=<release>/config/config.properties --model-store=<release>/model-store`,
    as deploy/kubernetes/deployment.yaml and deploy/kserve/ start it (there with --foreground). The test changes
    only the listening addresses, to free loopback ports, and the gRPC ports, so that it can run beside others."""
    ports = {key: free_port() for key in ADDRESS_KEYS.values()}
    lines = []
    for line in (release / "config" / "config.properties").read_text().splitlines():
        key = line.split("=", 1)[0]
        lines.append(f"{key}=http://127.0.0.1:{ports[key]}" if key in ports else line)
    lines += [f"grpc_inference_port={free_port()}", f"grpc_management_port={free_port()}"]
    config = state / "config.properties"
    config.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, TMPDIR=str(state), TEMP=str(state), LOG_LOCATION=str(state / "logs"),
               METRICS_LOCATION=str(state / "logs"), JAVA_HOME=java_home())
    env["PATH"] = f"{env['JAVA_HOME']}/bin{os.pathsep}{env['PATH']}"
    urls = {api: f"http://127.0.0.1:{ports[key]}" for api, key in ADDRESS_KEYS.items()}
    subprocess.run([tool("torchserve"), "--start", "--ncs", f"--ts-config={config}",
                    f"--model-store={release / 'model-store'}"], cwd=state, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                workers = [w for entry in requests.get(f"{urls['management']}/models/{MODEL_NAME}/all",
                                                       timeout=5).json()
                           for w in entry.get("workers", [])]
                if workers and all(w["status"] == "READY" for w in workers) \
                        and requests.get(f"{urls['inference']}/ping", timeout=5).status_code == 200:
                    break
            except (requests.RequestException, ValueError, AttributeError, TypeError):
                pass
            assert time.time() < deadline, f"TorchServe not ready in {timeout}s; see {state / 'logs'}"
            time.sleep(1)
        yield urls
    finally:
        subprocess.run([tool("torchserve"), "--stop"], cwd=state, env=env, capture_output=True)


def test_a_release_serves_the_version_it_names_not_the_highest_without_tokens(versioned_store, tmp_path):
    release = tmp_path / "release-1"
    make_release(["--out", str(release), archive(versioned_store, 2), archive(versioned_store, 1),
                  "--default", f"{MODEL_NAME}=1.0", "--batch-size", "3", "--max-batch-delay", "20"])
    state = tmp_path / "state"
    state.mkdir()
    with torchserve_as_in_the_pods(release, state) as urls:
        ping = requests.get(f"{urls['inference']}/ping", timeout=5)
        assert ping.status_code == 200 and ping.json()["status"] == "Healthy"
        assert predict(urls["inference"])["model_version"] == "1.0"
        assert predict(urls["inference"], "2.0")["model_version"] == "2.0"
        described = requests.get(f"{urls['management']}/models/{MODEL_NAME}", timeout=5).json()
        assert described[0]["modelVersion"] == "1.0"
        # the release's batch size (3), not the archive's model-config.yaml (2): the release config decides
        assert described[0]["batchSize"] == 3
        # model control is off: nothing registers an archive at run time
        refused = requests.post(f"{urls['management']}/models", params={"url": f"{MODEL_NAME}-v1.mar"}, timeout=5)
        assert refused.status_code == 405
        assert not (state / "key_file.json").exists()
        check = healthcheck("--state-dir", str(tmp_path / "no-state"), "--url", urls["inference"],
                            "--management-url", urls["management"])
        assert check.returncode == 0 and check.stdout.startswith("healthy"), check.stdout + check.stderr

        # /ping stays Healthy without a READY worker for the default version; the readiness check does not
        scaled = requests.put(f"{urls['management']}/models/{MODEL_NAME}/1.0",
                              params={"min_worker": 0, "max_worker": 0, "synchronous": "true"}, timeout=60)
        assert scaled.status_code == 200, scaled.text
        assert requests.get(f"{urls['inference']}/ping", timeout=5).json()["status"] == "Healthy"
        check = healthcheck("--state-dir", str(tmp_path / "no-state"), "--url", urls["inference"],
                            "--management-url", urls["management"])
        assert check.returncode == 1 and f"no READY worker yet for {MODEL_NAME} 1.0" in check.stderr, \
            check.stdout + check.stderr


def test_make_release_keeps_the_template_and_writes_only_the_snapshot(versioned_store, tmp_path):
    release = tmp_path / "release"
    make_release(["--out", str(release), archive(versioned_store, 1)])
    template = (ROOT / "deploy" / "storage" / "config" / "config.properties").read_text().splitlines()
    written = (release / "config" / "config.properties").read_text().splitlines()
    assert len(template) == len(written)
    differing = [(a, b) for a, b in zip(template, written) if a != b]
    assert len(differing) == 1 and differing[0][1].startswith("model_snapshot=")
    snapshot = json.loads(differing[0][1].split("=", 1)[1])
    assert snapshot["models"] == {MODEL_NAME: {"1.0": {"defaultVersion": True, "marName": f"{MODEL_NAME}-v1.mar",
                                                       "minWorkers": 1, "maxWorkers": 1, "batchSize": 64,
                                                       "maxBatchDelay": 5, "responseTimeout": 120}}}
    assert (release / "model-store" / f"{MODEL_NAME}-v1.mar").read_bytes() == \
        Path(archive(versioned_store, 1)).read_bytes()


@pytest.mark.parametrize("extra,message", [
    ([], "say which one is the default"),
    (["--default", f"{MODEL_NAME}=3.0"], "no archive given holds that version"),
    (["--default", "other=1.0"], "which no archive given holds"),
    (["--default", "no-equals-sign"], "expected NAME=VERSION"),
])
def test_make_release_refuses_an_unclear_default(versioned_store, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        make_release(["--out", str(tmp_path / "r"), archive(versioned_store, 1), archive(versioned_store, 2), *extra])
    assert message in str(exit_.value)
    assert not (tmp_path / "r").exists()


def test_make_release_never_changes_an_existing_release(versioned_store, tmp_path):
    release = tmp_path / "release"
    make_release(["--out", str(release), archive(versioned_store, 1)])
    with pytest.raises(SystemExit) as exit_:
        make_release(["--out", str(release), archive(versioned_store, 2)])
    assert "never changed" in str(exit_.value)
    assert (release / "model-store").iterdir().__next__().name == f"{MODEL_NAME}-v1.mar"


# -- the image's health check (token authorization on) -----------------------------------------------------------

def test_the_health_check_pings_with_the_key_and_renews_a_refused_one(versioned_store, tmp_path):
    state = tmp_path / "state"
    with running_torchserve(state, versioned_store, [f"{MODEL_NAME}={MODEL_NAME}-v1.mar"]) as server:
        check = healthcheck("--state-dir", str(state))
        assert check.returncode == 0 and '"Healthy"' in check.stdout, check.stdout + check.stderr

        # without a key /ping is refused: the check's key matters
        assert requests.get(f"{server.urls['inference']}/ping", timeout=5).status_code in (400, 401)

        # a key TorchServe refuses, as after token_expiration_min: the check gets a new one with the API key
        keys = json.loads(server.key_file.read_text())
        keys["inference"]["key"] = "not-the-key"
        server.key_file.write_text(json.dumps(keys))
        check = healthcheck("--state-dir", str(state))
        assert check.returncode == 0, check.stdout + check.stderr
        renewed = server.keys()["inference"]
        assert renewed != "not-the-key"
        assert predict(server.urls["inference"], headers=server.headers())["model_version"] == "1.0"

        # a refused management key (the check asks management for the workers) is renewed the same way
        keys = json.loads(server.key_file.read_text())
        keys["management"]["key"] = "not-the-key"
        server.key_file.write_text(json.dumps(keys))
        check = healthcheck("--state-dir", str(state))
        assert check.returncode == 0, check.stdout + check.stderr
        assert server.keys()["management"] != "not-the-key"

        # a refused key and no valid API key to renew it with: unhealthy, and the reason
        keys = json.loads(server.key_file.read_text())
        keys["inference"]["key"] = keys["API"]["key"] = "wrong"
        server.key_file.write_text(json.dumps(keys))
        check = healthcheck("--state-dir", str(state))
        assert check.returncode == 1 and "renewing it failed" in check.stderr, check.stdout + check.stderr
    check = healthcheck("--state-dir", str(state))
    assert check.returncode == 1 and "unhealthy: nothing answers" in check.stderr


# -- serving.serve: the version the operator chose ---------------------------------------------------------------

def test_models_from_the_environment_are_words_separated_by_spaces_or_commas():
    assert models_from_env({MODELS_ENV: f" {MODEL_NAME}={MODEL_NAME}-v1.mar, other.mar "}) == \
        [f"{MODEL_NAME}={MODEL_NAME}-v1.mar", "other.mar"]
    assert models_from_env({MODELS_ENV: " "}) is None
    assert models_from_env({}) is None


def test_several_versions_and_no_choice_is_an_error_when_a_choice_is_required(versioned_store, tmp_path):
    with pytest.raises(NoVersionChosen, match=rf"versions 1\.0, 2\.0 of {MODEL_NAME}.*{MODELS_ENV}="):
        startup_models(versioned_store, tmp_path, require_choice=True)
    # without the requirement, the highest, as before
    assert startup_models(versioned_store, tmp_path) == [f"{MODEL_NAME}={MODEL_NAME}-v2.mar"]


def test_the_recorded_default_wins_over_the_highest(versioned_store, tmp_path):
    (tmp_path / "default_history.json").write_text(json.dumps({MODEL_NAME: ["2.0", "1.0"]}))
    assert startup_models(versioned_store, tmp_path, require_choice=True) == [f"{MODEL_NAME}={MODEL_NAME}-v1.mar"]


def test_one_version_needs_no_choice(versioned_store, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / f"{MODEL_NAME}-v2.mar").write_bytes(Path(archive(versioned_store, 2)).read_bytes())
    assert startup_models(store, tmp_path, require_choice=True) == [f"{MODEL_NAME}={MODEL_NAME}-v2.mar"]


def test_serve_start_stops_before_torchserve_when_no_version_is_chosen(versioned_store, tmp_path, monkeypatch):
    monkeypatch.delenv(MODELS_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_:
        serve_main(["start", "--require-choice", "--model-store", str(versioned_store), "--state-dir",
                    str(tmp_path)])
    assert str(exit_.value).startswith("error: ") and MODELS_ENV in str(exit_.value)
    assert not (tmp_path / "key_file.json").exists()


def test_serve_start_takes_the_choice_from_the_environment(versioned_store, tmp_path, monkeypatch):
    monkeypatch.setenv(MODELS_ENV, f"{MODEL_NAME}={MODEL_NAME}-v3.mar")
    with pytest.raises(SystemExit) as exit_:
        serve_main(["start", "--require-choice", "--model-store", str(versioned_store), "--state-dir",
                    str(tmp_path)])
    assert f"{MODEL_NAME}-v3.mar" in str(exit_.value) and "not in" in str(exit_.value)


def test_serve_start_serves_the_version_named_in_the_environment(versioned_store, tmp_path, monkeypatch, capsys):
    """The image's start command with VISUAL_SEARCH_MODELS naming 1.0 while 2.0 is in the store."""
    config = tmp_path / "config.properties"
    lines = []
    for line in (ROOT / "config.properties").read_text().splitlines():
        key = line.split("=", 1)[0]
        lines.append(f"{key}=http://127.0.0.1:{free_port()}" if key in ADDRESS_KEYS.values() else line)
    config.write_text("\n".join(lines + [f"grpc_inference_port={free_port()}",
                                         f"grpc_management_port={free_port()}"]) + "\n")
    state = tmp_path / "state"
    monkeypatch.setenv(MODELS_ENV, f"{MODEL_NAME}={MODEL_NAME}-v1.mar")
    common = ["--model-store", str(versioned_store), "--state-dir", str(state), "--config", str(config)]
    try:
        serve_main(["start", "--require-choice", "--timeout", "240", *common])
        assert f"ready with {MODEL_NAME}={MODEL_NAME}-v1.mar" in capsys.readouterr().out
        keys = json.loads((state / "key_file.json").read_text())
        inference = next(line.split("=", 1)[1] for line in lines if line.startswith("inference_address="))
        answer = predict(inference, headers={"Authorization": f"Bearer {keys['inference']['key']}"})
        assert answer["model_version"] == "1.0"
    finally:
        serve_main(["stop", *common])
