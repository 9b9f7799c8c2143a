"""A model line's files in the model store: the version record (<name>.versions.json, one entry per version built),
its change log (<name>.changes.sqlite) and its lock, which every writer of the line holds while it writes."""
from contextlib import contextmanager
from pathlib import Path

from visual_search.catalogue.changes import CHANGES_SUFFIX
from visual_search.fileio import exclusive_lock, read_json, write_json

RECORD_SUFFIX = ".versions.json"


def record_path(store, name):
    return Path(store) / f"{name}{RECORD_SUFFIX}"


def changes_path(store, name):
    return Path(store) / f"{name}{CHANGES_SUFFIX}"


@contextmanager
def line_lock(store, name, wait=False):
    """The line's exclusive lock; without `wait`, a second writer is refused with a message that says why."""
    with exclusive_lock(Path(store) / f".{name}.lock", wait=wait, what=f"the model line {name!r}"):
        yield


def read_record(store, name):
    """{"model": name, "versions": [...]}; a corrupt file raises ValueError in one line that names it."""
    path = record_path(store, name)
    if not path.is_file():
        return {"model": name, "versions": []}
    record = read_json(path, "version record")
    if not isinstance(record, dict) or record.get("model") != name or not isinstance(record.get("versions"), list):
        raise ValueError(f"{path} is not the version record of {name!r}")
    return record


def latest_version(store, name):
    """The latest recorded version's entry, or None."""
    versions = read_record(store, name)["versions"]
    return versions[-1] if versions else None


def append_version(store, name, entry):
    """Adds `entry` to the record, atomically (the caller holds the line's lock). Returns the record."""
    record = read_record(store, name)
    record["versions"].append(entry)
    write_json(record_path(store, name), record, replace=True)
    return record
