"""`serving.serve start` keeps the token keys fresh: with keys that expire in seconds, the key file still holds a
working inference key long after the first one expired, and `stop` ends the renewal with TorchServe."""
import json
import subprocess
import sys
import time
from pathlib import Path

import requests

from serving.serve import renewal_pid
from serving.torchserve import DEFAULT_CONFIG, ROOT, free_port, read_properties
from tests.conftest import MODEL_NAME
from tests.test_serving import photo_bytes

LIFETIME_MIN = 0.1  # six seconds: TorchServe reads token_expiration_min as a float


def serve(*argv, state_dir, config, store):
    return subprocess.run([sys.executable, "-m", "serving.serve", *argv, "--state-dir", str(state_dir), "--config",
                           str(config), "--model-store", str(store)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def predict_with(url, key):
    return requests.post(url, data=photo_bytes(), timeout=60,
                         headers={"Authorization": f"Bearer {key}", "Content-Type": "image/jpeg"})


def test_keys_are_renewed_while_serving_and_the_renewal_stops_with_torchserve(model_store, tmp_path):
    props = {**read_properties(DEFAULT_CONFIG), "token_expiration_min": str(LIFETIME_MIN),
             "grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port())}
    ports = {key: free_port() for key in ("inference_address", "management_address", "metrics_address")}
    props.update({key: f"http://127.0.0.1:{port}" for key, port in ports.items()})
    config = tmp_path / "config.properties"
    config.write_text("".join(f"{key}={value}\n" for key, value in props.items()))
    state = tmp_path / "state"
    started = serve("start", "--models", f"{MODEL_NAME}.mar", state_dir=state, config=config, store=model_store)
    assert started.returncode == 0, started.stderr[-2000:]
    url = f"{props['inference_address']}/predictions/{MODEL_NAME}"
    try:
        first = json.loads((state / "key_file.json").read_text())["inference"]["key"]
        assert predict_with(url, first).status_code == 200
        assert renewal_pid(state) is not None
        time.sleep(3 * 60 * LIFETIME_MIN)
        assert predict_with(url, first).status_code in (400, 401), "the first key should have expired"
        current = json.loads((state / "key_file.json").read_text())["inference"]["key"]
        assert current != first and predict_with(url, current).status_code == 200
        assert "keys renewed" in Path(state / "key-renewal.log").read_text()
    finally:
        stopped = serve("stop", state_dir=state, config=config, store=model_store)
    assert stopped.returncode == 0, stopped.stderr
    assert renewal_pid(state) is None
