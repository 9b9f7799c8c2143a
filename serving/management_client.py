"""A client for TorchServe's management API, token authorization kept on: one ManagementError, whose message says
what went wrong, for every failure. The previous defaults live in default_history.json in the state folder, for
`rollback`."""
import re
import time
from pathlib import Path

import requests

from serving.torchserve import (
    DEFAULT_CONFIG,
    DEFAULT_STATE,
    KEY_FILE,
    MODEL_STORE,
    TorchServeError,
    archive_identity,
    is_refused_token,
    read_keys,
    read_properties,
    renew_key,
)
from visual_search.fileio import exclusive_lock, read_json, write_json

HISTORY_FILE = "default_history.json"


class ManagementError(TorchServeError):
    """A management call failed; the message is meant for the operator."""


class ManagementClient:
    def __init__(self, url, key_file, model_store, history_file=None, timeout=300):
        self.url = url.rstrip("/")
        self.key_file = Path(key_file)
        self.model_store = Path(model_store)
        self.history_file = Path(history_file) if history_file else self.key_file.parent / HISTORY_FILE
        self.timeout = timeout

    @classmethod
    def from_state(cls, state_dir=DEFAULT_STATE, key_file=None, url=None, model_store=None, config=None, **kwargs):
        """Settings of the TorchServe whose state is in `state_dir`: its config.properties (written by
        serving.torchserve at start) gives the management address and the model store; the repository's
        config.properties is the fallback. Explicit arguments win."""
        state_dir = Path(state_dir)
        config = Path(config) if config else next(
            (p for p in (state_dir / "config.properties", DEFAULT_CONFIG) if p.is_file()), None)
        props = read_properties(config) if config else {}
        url = url or props.get("management_address", "http://127.0.0.1:8081")
        store = model_store or props.get("model_store") or MODEL_STORE
        return cls(url, key_file or state_dir / KEY_FILE, model_store=store, **kwargs)

    # -- HTTP ------------------------------------------------------------------------------------------------------

    def _keys(self):
        try:
            return read_keys(self.key_file)
        except TorchServeError as error:
            raise ManagementError(f"{error}; pass --state-dir or --key-file") from None

    def _send(self, method, path, params=None, key=None):
        url = f"{self.url}{path}"
        try:
            return requests.request(method, url, params=params, timeout=self.timeout,
                                    headers={"Authorization": f"Bearer {key or self._keys().get('management', '')}"})
        except requests.ConnectionError:
            raise ManagementError(f"TorchServe is unreachable at {self.url}: is it running? "
                                  f"(python -m serving.serve status)") from None
        except requests.Timeout:
            raise ManagementError(f"TorchServe at {self.url} did not answer {method} {path} in {self.timeout}s"
                                  ) from None

    def _renew_management_key(self):
        """A fresh management key, asked for with the API key; False if TorchServe refuses."""
        try:
            renew_key(self.url, self.key_file, "management", self.timeout)
            return True
        except TorchServeError:
            return False

    def call(self, method, path, params=None):
        """The decoded JSON answer of a management call; raises ManagementError on any failure."""
        response = self._send(method, path, params)
        if is_refused_token(response) and self._renew_management_key():
            response = self._send(method, path, params)
        if response.status_code < 300:
            return response.json() if response.content else {}
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text.strip()
        if response.status_code in (400, 401) and "Token" in message:
            raise ManagementError(f"TorchServe refused the management token from {self.key_file}: {message}. "
                                  f"Is that the key file of the TorchServe at {self.url}?")
        if response.status_code == 404:
            message = f"unknown model or version: {message}"
        if response.status_code == 405:
            message += " (model control is off: set enable_model_api=true in config.properties)"
        raise ManagementError(f"{method} {path}: HTTP {response.status_code}: {message}")

    # -- queries ---------------------------------------------------------------------------------------------------

    def model_names(self):
        names, token = [], None
        while True:
            answer = self.call("GET", "/models", {"limit": 100, **({"next_page_token": token} if token else {})})
            names += [m["modelName"] for m in answer.get("models", [])]
            token = answer.get("nextPageToken")
            if not token:
                return names

    def versions(self, name):
        """Every registered version of `name`: TorchServe's description plus "default" (bool)."""
        default = self.default_version(name)
        return [{**entry, "default": entry["modelVersion"] == default}
                for entry in self.call("GET", f"/models/{name}/all")]

    def default_version(self, name):
        return self.call("GET", f"/models/{name}")[0]["modelVersion"]

    def describe(self, name, version):
        return self.call("GET", f"/models/{name}/{version}")[0]

    def ready_workers(self, name, version):
        return sum(w.get("status") == "READY" for w in self.describe(name, version).get("workers", []))

    def wait_ready(self, name, version, workers=1, timeout=300):
        deadline = time.time() + timeout
        while self.ready_workers(name, version) < workers:
            if time.time() > deadline:
                raise ManagementError(f"{name} {version}: fewer than {workers} READY workers after {timeout}s; "
                                      f"see TorchServe's logs/model_log.log")
            time.sleep(0.5)

    def wait_drained(self, name, version, quiet=2.0, timeout=60):
        """Waits until this version's queue has stayed empty for `quiet` seconds. TorchServe 0.12 counts queued
        requests only, and unregistering drops the batch a worker is running, so the quiet spell covers the
        requests routed to this version just before the default moved away from it."""
        deadline, empty_since = time.time() + timeout, None
        while time.time() < deadline:
            if self.describe(name, version).get("jobQueueStatus", {}).get("pendingRequests", 0):
                empty_since = None
            elif empty_since is None:
                empty_since = time.time()
            elif time.time() - empty_since >= quiet:
                return
            time.sleep(0.2)
        raise ManagementError(f"{name} {version} still has queued requests after {timeout}s: is a client "
                              f"calling /predictions/{name}/{version} directly?")

    # -- changes ---------------------------------------------------------------------------------------------------

    def register(self, archive, workers=1, set_default=False, ready_timeout=300):
        """Registers `archive` (a file in the model store) as a version of the model named inside it.

        Returns (name, version). The new version serves only /predictions/{name}/{version} until it is made
        the default, which happens here only with set_default=True and once its workers are READY."""
        archive_name = Path(archive).name
        local = self.model_store / archive_name
        elsewhere = Path(archive).parent != Path(".") and Path(archive).resolve() != local.resolve()
        if elsewhere or not archive_name.endswith(".mar") or not local.is_file():
            raise ManagementError(f"{archive} is not an archive in the model store {self.model_store}: "
                                  f"TorchServe loads archives from there only. Build it there (python -m "
                                  f"training.update_catalogue ...) or copy it in")
        try:
            name, version = archive_identity(local)
        except TorchServeError as error:
            raise ManagementError(str(error)) from None
        if name in self.model_names() and version in [v["modelVersion"] for v in self.versions(name)]:
            raise ManagementError(f"{name} version {version} is already registered; unregister it first or "
                                  f"build the archive with another version")
        try:
            self.call("POST", "/models", {"url": archive_name, "initial_workers": workers, "synchronous": "true"})
        except ManagementError as error:
            reason = self.worker_error(name, version)
            raise ManagementError(f"{error}; the worker said: {reason}" if reason else str(error)) from None
        self.wait_ready(name, version, min(workers, 1), ready_timeout)
        self._remember(name, self.default_version(name))
        if set_default:
            self.set_default(name, version)
        return name, version

    def worker_error(self, name, version):
        """The last exception line a worker of name/version logged (model_log.log beside the key file), or None:
        TorchServe answers a failed load with "Failed to start workers" alone."""
        log = self.key_file.parent / "logs" / "model_log.log"
        try:
            lines = log.read_text(errors="replace").splitlines()[-2000:]
        except OSError:
            return None
        tag = f"-{name}_{version}-stdout MODEL_LOG - "
        errors = [line.split(tag, 1)[1] for line in lines
                  if tag in line and re.match(r"[\w.]+(Error|Exception): ", line.split(tag, 1)[1])]
        return errors[-1] if errors else None

    def set_default(self, name, version, ready_timeout=300):
        """Makes `version` the default, once it has a READY worker, and records the switch for rollback."""
        previous = self.default_version(name)
        self.describe(name, version)  # a clear 404 for an unknown version
        self.wait_ready(name, version, 1, ready_timeout)
        self.call("PUT", f"/models/{name}/{version}/set-default")
        self._remember(name, previous)
        self._remember(name, version)
        return previous

    def rollback(self, name):
        """Sets the default back to the one before the current default. Returns (from, to)."""
        current = self.default_version(name)
        registered = {v["modelVersion"] for v in self.versions(name)}
        stack = [v for v in self._history().get(name, []) if v in registered]
        while stack and stack[-1] == current:
            stack.pop()
        if not stack:
            raise ManagementError(f"no earlier default of {name} is recorded in {self.history_file} among the "
                                  f"registered versions {sorted(registered)}: use set-default VERSION")
        target = stack[-1]
        self.wait_ready(name, target, 1, 60)
        self.call("PUT", f"/models/{name}/{target}/set-default")
        self._save_history(name, stack)  # the rolled-back default leaves the history
        return current, target

    def scale(self, name, version, min_workers, max_workers=None, force=False, quiet=2.0):
        """Sets the workers of one version. TorchServe 0.12 fails the batch that a stopped worker is running
        ("Worker died."), so fewer workers for the default version, which takes the traffic, needs `force`;
        a version that is not the default is drained first, as for unregister."""
        max_workers = max(max_workers or min_workers, min_workers)
        current = len(self.describe(name, version).get("workers", []))
        if min_workers < current:
            if version == self.default_version(name):
                if min_workers < 1:
                    raise ManagementError(f"{name} {version} is the default version: it needs at least one worker")
                if not force:
                    raise ManagementError(
                        f"{name} {version} is the default version: removing a worker under load fails the requests "
                        f"it is running (TorchServe 0.12). Move the default away first, or pass --force in a quiet "
                        f"period")
            else:
                self.wait_drained(name, version, quiet)
        return self.call("PUT", f"/models/{name}/{version}",
                         {"min_worker": min_workers, "max_worker": max_workers, "synchronous": "true"})

    def unregister(self, name, version, quiet=2.0):
        """Unregisters a version that is not the default, once the requests sent to it are done."""
        self.describe(name, version)  # a clear 404 for an unknown version
        if version == self.default_version(name):
            raise ManagementError(f"{name} {version} is the default version: set another default (set-default or "
                                  f"rollback) before unregistering it")
        self.wait_drained(name, version, quiet)
        answer = self.call("DELETE", f"/models/{name}/{version}")
        history = self._history()
        if name in history:
            self._save_history(name, [v for v in history[name] if v != version])
        return answer

    # -- default-version history -----------------------------------------------------------------------------------

    def _history(self):
        if not self.history_file.is_file():
            return {}
        try:
            return read_json(self.history_file, "default-version history")
        except ValueError as error:
            raise ManagementError(str(error)) from None

    def _save_history(self, name, stack):
        with exclusive_lock(self.history_file.with_name(f".{self.history_file.name}.lock"), what=self.history_file):
            history = self._history()
            history[name] = stack
            write_json(self.history_file, history, replace=True)

    def _remember(self, name, version):
        stack = self._history().get(name, [])
        if not stack or stack[-1] != version:
            self._save_history(name, stack + [version])
