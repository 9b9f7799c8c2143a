"""catalogue.json: the catalogue folder's manifest, and file integrity (a full sha256 once at publish, a cheap
sampled check at every open, which misses a change that keeps the size and every sampled block: run `verify`)."""
import hashlib
import json
import os
from pathlib import Path

from ..errors import CatalogueError
from ..fileio import sha256_file, write_json

FORMAT = "visual-search-catalogue"
FORMAT_VERSION = 1
MANIFEST_FILE = "catalogue.json"
INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.sqlite"
CATEGORIES_FILE = "categories.npy"
LISTS_FILE = "lists.npy"  # IVF indexes only
SAMPLE_BLOCKS, SAMPLE_BYTES = 16, 4096


def sample_digest(path, size=None):
    """sha256 over the size and 16 blocks of 4 KiB at evenly spaced offsets (the whole file when it is small)."""
    size = os.path.getsize(path) if size is None else size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
            digest.update(f.read())
        else:
            step = (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1)
            for block in range(SAMPLE_BLOCKS):
                digest.update(os.pread(f.fileno(), SAMPLE_BYTES, block * step))
    return digest.hexdigest()


def file_record(path, progress=False):
    size = os.path.getsize(path)
    return {"bytes": size, "sha256": sha256_file(path, progress), "sample_sha256": sample_digest(path, size)}


def write_manifest(folder, manifest):
    write_json(Path(folder) / MANIFEST_FILE, manifest)


def read_manifest(folder):
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise CatalogueError(f"catalogue folder not found: {folder}")
    if not path.is_file():
        raise CatalogueError(f"{folder} is not a catalogue folder: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CatalogueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CatalogueError(f"{path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                             f"expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CatalogueError(f"{path}: format_version {manifest.get('format_version')!r}, this code reads "
                             f"{FORMAT_VERSION}")
    for key in ("uid", "items_uid", "count", "dim", "categories", "category_counts", "key_space", "factory", "search",
                "segments", "files", "normalized"):
        if key not in manifest:
            raise CatalogueError(f"{path} lacks {key!r}")
    return manifest


def check_files(folder, manifest):
    """The cheap check at open: every listed file is there, with its size and sampled fingerprint."""
    folder = Path(folder)
    for name, record in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise CatalogueError(f"{folder}: {name} is missing")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise CatalogueError(f"{folder}: {name} is {size} bytes, the manifest says {record['bytes']} "
                                 f"({'truncated' if size < record['bytes'] else 'longer than published'})")
        if sample_digest(path, size) != record["sample_sha256"]:
            raise CatalogueError(f"{folder}: {name} is not the file this catalogue was published with "
                                 f"(its sampled bytes differ: swapped or modified)")


def verify_files(folder, manifest=None, progress=True):
    """The full check, for publish time: sha256 of every file against the manifest. Returns the bytes read."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    check_files(folder, manifest)
    total = 0
    for name, record in manifest["files"].items():
        if sha256_file(folder / name, progress) != record["sha256"]:
            raise CatalogueError(f"{folder}: {name} does not match its sha256 in {MANIFEST_FILE}")
        total += record["bytes"]
    return total
