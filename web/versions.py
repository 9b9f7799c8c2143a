"""The versions the page offers: TorchServe's default (learned from the model_version of answers, or asked with a
small search) and those --versions allows, each with the categories and k bounds of its archive. Any other
version is refused from this list alone, without calling TorchServe."""
import re
import threading
import time
from pathlib import Path

from serving.torchserve import TorchServeError, read_archive

VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class NotOffered(ValueError):
    """A version the front does not offer; the message says what it offers."""


def version_key(version):
    return tuple(int(part) if part.isdigit() else -1 for part in version.split("."))


def parse_versions(text):
    """"2.0,3.0" -> ["2.0", "3.0"]; raises ValueError naming a malformed version."""
    versions = [v.strip() for v in text.split(",") if v.strip()]
    for version in versions:
        if not VERSION.fullmatch(version):
            raise ValueError(f"{version!r} is not a version (letters, digits, '.', '_' and '-')")
    return list(dict.fromkeys(versions))


def offer_of(path):
    """((model name, version), facts) of an archive in the model store; (None, {}) when unreadable.

    facts: {"categories", "items", "default_k", "max_k"}."""
    try:
        archive = read_archive(path)
        handler = archive.config.get("handler") or {}
        items = int(archive.manifest.get("catalogue", {}).get("count", 0))
        default_k, max_k = int(handler.get("default_k", 4)), int(handler.get("max_k", 100))
    except (TorchServeError, TypeError, ValueError, AttributeError):
        return None, {}
    categories = archive.catalogue.get("categories") or archive.manifest.get("categories", [])  # filter choices
    return (archive.name, archive.version), {"categories": [str(c) for c in categories], "items": items,
                                             "default_k": default_k, "max_k": min(max_k, items) if items else max_k}


def folder_categories(images_dir):
    try:
        return sorted(p.name for p in Path(images_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


class ModelStore:
    """The archives of one model in the model store, by version; each file read again only when it changes."""

    def __init__(self, folder, model):
        self.folder, self.model = Path(folder), model
        self._read = {}  # (path, mtime, size) -> offer_of's answer
        self._lock = threading.Lock()

    def facts(self, version):
        """The facts of the newest archive of `version`; {} when the store has none."""
        with self._lock:
            found, seen = {}, {}
            try:
                paths = sorted(self.folder.glob("*.mar"), key=lambda p: p.stat().st_mtime)
            except OSError:
                paths = []
            for path in paths:
                try:
                    stat = path.stat()
                except OSError:
                    continue
                key = (str(path), stat.st_mtime_ns, stat.st_size)
                seen[key] = self._read.get(key) or offer_of(path)
                identity, facts = seen[key]
                if identity == (self.model, version):
                    found = facts
            self._read = seen
            return found


class Versions:
    """The default version (learned from answers, asked for when unknown or older than `ttl` seconds) and the
    allowed ones."""

    def __init__(self, model, store, images_dir, ask_default, allowed=(), ttl=30.0):
        self.model, self.store, self.images_dir = model, store, images_dir
        self.ask_default, self.allowed, self.ttl = ask_default, tuple(allowed), ttl
        self._default, self._at = None, 0.0
        self._lock, self._asking = threading.Lock(), threading.Lock()

    def note_default(self, version):
        """Records the version that answered a search sent to the default."""
        if isinstance(version, str) and version:
            with self._lock:
                self._default, self._at = version, time.monotonic()

    def known_default(self):
        with self._lock:
            return self._default

    def default(self):
        """The default version; asks TorchServe (one search) when none was seen for `ttl` seconds."""
        with self._asking:
            with self._lock:
                if self._default is not None and time.monotonic() - self._at <= self.ttl:
                    return self._default
            self.note_default(self.ask_default())
            return self.known_default()

    def list(self):
        """[{"version", "default", "categories", "items", "default_k", "max_k"}]: the default first, then the
        allowed versions newest first. Raises web.torchserve_client.TorchServeUnavailable when TorchServe cannot
        tell the default."""
        default = self.default()
        others = sorted((v for v in self.allowed if v != default), key=version_key, reverse=True)
        return [self._entry(version, version == default) for version in [default, *others]]

    def route(self, version):
        """(the version to name in the URL, the version the answer must come from) for a requested version, None
        for the default. Raises NotOffered for any version that is neither allowed nor the default."""
        if version is None:
            return None, None
        if version in self.allowed:
            return version, None
        if version == self.known_default():
            return None, version  # sent to the default, so that a default that moved on is noticed
        raise NotOffered(self.refusal(version))

    def refusal(self, version):
        offered = ", ".join(["the default (no version)", *self.allowed])
        return f"version {version!r} of {self.model} is not offered here; search {offered}"

    def _entry(self, version, is_default):
        facts = self.store.facts(version)
        return {"version": version, "default": is_default,
                "categories": facts.get("categories") or folder_categories(self.images_dir),
                "items": facts.get("items"), "default_k": facts.get("default_k", 4),
                "max_k": facts.get("max_k", 100)}
