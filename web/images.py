"""Catalogue images: an image reference is served only when it appeared in an answer the front forwarded (a bounded
LRU map), and only from the catalogue folder: `..`, hidden segments, absolute paths, backslashes, NUL bytes and
symlinks that lead out of it are refused."""
import threading
from collections import OrderedDict
from pathlib import Path
from urllib.parse import quote

from visual_search.catalogue.changes import ChangeLog
from visual_search.images import IMAGE_SUFFIXES

DEFAULT_REMEMBERED = 100_000


def is_url(reference):
    return reference.startswith(("http://", "https://"))


def resolve_image(root, reference):
    """The file that `reference` names inside `root`, or None when it is not a catalogue image there."""
    if not reference or "\\" in reference or "\x00" in reference or reference.startswith("/"):
        return None
    parts = reference.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return None
    if Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    try:
        root = Path(root).resolve(strict=True)
        path = root.joinpath(*parts).resolve(strict=True)  # follows every symlink on the way
    except (OSError, RuntimeError, ValueError):
        return None
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def image_url(reference):
    """Where the page loads a neighbour's image: our /images/ route, or the catalogue's own URL."""
    if is_url(reference):
        return reference
    return "/images/" + quote(reference)


def answer_items(answer):
    """The neighbours of an answer, then its listing (a search by listing id)."""
    listing = answer.get("listing")
    return [item for item in [*answer.get("neighbours", []), listing]
            if isinstance(item, dict) and isinstance(item.get("image"), str)]


class ServableImages:
    """The image references of the answers the front forwarded, with their listing ids: the `capacity` most recently
    used, thread-safe. With the line's change log (`changes`), a listing removed since is not served."""

    def __init__(self, capacity=DEFAULT_REMEMBERED, changes=None):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity, self.changes_path, self.changes = capacity, Path(changes) if changes else None, None
        self._seen, self._lock = OrderedDict(), threading.Lock()

    def record(self, answer):
        """Remembers every folder image reference in a forwarded answer, and its listing id."""
        with self._lock:
            for item in answer_items(answer):
                if not is_url(item["image"]):
                    self._seen[item["image"]] = item.get("id")
                    self._seen.move_to_end(item["image"])
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)

    def is_servable(self, reference):
        """Whether the front may serve `reference`: it appeared in an answer the front forwarded, and its listing
        has not been removed since."""
        with self._lock:
            if reference not in self._seen:
                return False
            self._seen.move_to_end(reference)
            item_id = self._seen[reference]
            if self._removed(item_id):
                del self._seen[reference]
                return False
            return True

    def _removed(self, item_id):
        if item_id is None or self.changes_path is None:
            return False
        if self.changes is None:
            if not self.changes_path.is_file():
                return False
            self.changes = ChangeLog(self.changes_path)
        last = self.changes.latest(item_id)
        return last is not None and last.op == "remove"
