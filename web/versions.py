"""The model's registered versions, read-only, for the page's version picker: default first, each with the
categories (for the filter) and the k range its archive allows.

The versions come from TorchServe's management API (serving.management, management key kept here); the categories
and k bounds come from each version's archive in the model store (manifest.json and model-config.yaml, read
without unpacking the rest). When an archive cannot be read, the categories fall back to the catalogue image
folder's sub-folders, which are the categories by the catalogue's layout (<category>/<image file>).
"""
import json
import threading
import time
import zipfile
from pathlib import Path

import yaml

from serving.management import ManagementClient
from serving.serve import version_key


def archive_facts(path):
    """{"categories", "items", "default_k", "max_k"} from an archive in the model store; {} when unreadable."""
    try:
        with zipfile.ZipFile(path) as archive:
            config_name = json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"].get("configFile")
            manifest = json.loads(archive.read("manifest.json"))
            config = yaml.safe_load(archive.read(config_name)) if config_name else {}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, yaml.YAMLError):
        return {}
    handler = (config or {}).get("handler") or {}
    items = int(manifest.get("num_items", 0))
    categories = manifest.get("catalogue_categories") or manifest.get("categories", [])  # the filter's choices
    return {"categories": [str(c) for c in categories], "items": items,
            "default_k": int(handler.get("default_k", 4)),
            "max_k": min(int(handler.get("max_k", 100)), items) if items else int(handler.get("max_k", 100))}


def folder_categories(images_dir):
    try:
        return sorted(p.name for p in Path(images_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


class Versions:
    """The list, cached for `ttl` seconds so that a page load does not cost a management call each time."""

    def __init__(self, state_dir, model, images_dir, ttl=5.0, timeout=10):
        self.client = ManagementClient.from_state(state_dir, timeout=timeout)
        self.model, self.images_dir, self.ttl = model, images_dir, ttl
        self._cached, self._at, self._lock = None, 0.0, threading.Lock()
        self._facts = {}  # (archive path, mtime) -> archive_facts

    def list(self, fresh=False):
        """[{"version", "default", "categories", "items", "default_k", "max_k"}], the default first, then the
        others newest first. Raises serving.management.ManagementError when TorchServe cannot tell."""
        with self._lock:
            if fresh or self._cached is None or time.monotonic() - self._at > self.ttl:
                self._cached, self._at = self._read(), time.monotonic()
            return self._cached

    def find(self, version):
        """The entry of `version`, looking again once when it is not among the cached ones; None if unknown."""
        for fresh in (False, True):
            match = next((v for v in self.list(fresh) if v["version"] == version), None)
            if match:
                return match
        return None

    def _read(self):
        entries = []
        for entry in self.client.versions(self.model):
            facts = self._archive_facts(entry.get("modelUrl", ""))
            entries.append({"version": entry["modelVersion"], "default": entry["default"],
                            "categories": facts.get("categories") or folder_categories(self.images_dir),
                            "items": facts.get("items"), "default_k": facts.get("default_k", 4),
                            "max_k": facts.get("max_k", 100)})
        entries.sort(key=lambda v: version_key(v["version"]), reverse=True)
        entries.sort(key=lambda v: not v["default"])
        return entries

    def _archive_facts(self, model_url):
        name = Path(model_url).name
        if not name.endswith(".mar"):
            return {}
        path = self.client.model_store / name
        try:
            key = (str(path), path.stat().st_mtime)
        except OSError:
            return {}
        if key not in self._facts:
            self._facts[key] = archive_facts(path)
        return self._facts[key]
