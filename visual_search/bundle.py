"""The search bundle: the files a TorchServe archive carries, written together and validated together.

    model.pt          ProductNet state dict (weights only)
    catalogue.faiss   FAISS index, row i = catalogue.csv row i
    catalogue.csv     id, category, image (relative to the catalogue image folder, or a URL)
    manifest.json     categories, preprocessing, index and runtime settings, counts, versions, checksums of the
                      other three files, and the catalogue image folder it was built from (image_root), if known
"""
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ARCHIVE_FORMAT_VERSION, EMBEDDING_DIM
from .catalogue import read_csv, write_csv
from .index import load_index, save_index
from .model import ProductNet
from .preprocessing import PreprocessSettings

MODEL_FILE, INDEX_FILE, CATALOGUE_FILE, MANIFEST_FILE = "model.pt", "catalogue.faiss", "catalogue.csv", "manifest.json"
BUNDLE_FILES = (MODEL_FILE, INDEX_FILE, CATALOGUE_FILE, MANIFEST_FILE)
CHECKSUMS = {MODEL_FILE: "weights_sha256", INDEX_FILE: "index_sha256", CATALOGUE_FILE: "catalogue_sha256"}
DEFAULT_RUNTIME = {"precision": "fp32", "channels_last": False, "compile": False, "gpu_decode": False}


class BundleError(ValueError):
    """The bundle is incomplete or inconsistent; the message says what does not match."""


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Bundle:
    model: ProductNet
    index: object
    items: list
    manifest: dict

    @property
    def categories(self):
        return self.manifest["categories"]

    @property
    def preprocess(self):
        return PreprocessSettings.from_dict(self.manifest["preprocess"])

    @property
    def normalize(self):
        return self.manifest["normalize_embeddings"]


def write_bundle(out_dir, *, model, categories, preprocess, index, items, index_factory, normalize,
                 runtime=None, notes="", image_root=None):
    """Writes the four files; `image_root`, the folder the items' image references are relative to, is recorded
    for later catalogue updates (training.update_catalogue)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if index.ntotal != len(items):
        raise BundleError(f"index holds {index.ntotal} vectors for {len(items)} items")
    torch.save(model.state_dict(), out_dir / MODEL_FILE)
    save_index(index, out_dir / INDEX_FILE)
    write_csv(items, out_dir / CATALOGUE_FILE)
    manifest = {
        "format_version": ARCHIVE_FORMAT_VERSION,
        "embedding_dim": EMBEDDING_DIM,
        "categories": list(categories),
        "num_items": len(items),
        "index_factory": index_factory,
        "normalize_embeddings": bool(normalize),
        "preprocess": preprocess.to_dict(),
        "runtime": {**DEFAULT_RUNTIME, **(runtime or {})},
        **{key: sha256(out_dir / name) for name, key in CHECKSUMS.items()},
        "image_root": str(Path(image_root).resolve()) if image_root else None,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "notes": notes,
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(bundle_dir):
    path = Path(bundle_dir) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{path} is missing")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != ARCHIVE_FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {manifest.get('format_version')!r}, "
                          f"this code reads {ARCHIVE_FORMAT_VERSION}")
    if manifest.get("embedding_dim") != EMBEDDING_DIM:
        raise BundleError(f"{path}: embedding_dim {manifest.get('embedding_dim')}, expected {EMBEDDING_DIM}")
    return manifest


def load_bundle(bundle_dir, verify_checksums=True):
    """Loads and cross-checks every file of the bundle; raises BundleError naming the first mismatch."""
    bundle_dir = Path(bundle_dir)
    missing = [name for name in BUNDLE_FILES if not (bundle_dir / name).is_file()]
    if missing:
        raise BundleError(f"{bundle_dir} lacks {', '.join(missing)}")
    manifest = read_manifest(bundle_dir)
    if verify_checksums:
        for name, key in CHECKSUMS.items():
            if key not in manifest:
                raise BundleError(f"{MANIFEST_FILE} has no {key} (written before {name} was checksummed): "
                                  f"rebuild the bundle with training.build_index")
            if sha256(bundle_dir / name) != manifest[key]:
                raise BundleError(f"{name} does not match the checksum in {MANIFEST_FILE}")
    categories = manifest["categories"]
    if not categories or len(set(categories)) != len(categories):
        raise BundleError(f"categories must be a non-empty list of distinct names, got {categories}")
    PreprocessSettings.from_dict(manifest["preprocess"])

    items = read_csv(bundle_dir / CATALOGUE_FILE)
    if len(items) != manifest["num_items"]:
        raise BundleError(f"{CATALOGUE_FILE} has {len(items)} rows, manifest says {manifest['num_items']}")
    if len({it.id for it in items}) != len(items):
        raise BundleError(f"{CATALOGUE_FILE} repeats ids")
    try:
        index = load_index(bundle_dir / INDEX_FILE, expected_count=len(items))
    except ValueError as error:
        raise BundleError(str(error)) from None

    state = torch.load(bundle_dir / MODEL_FILE, map_location="cpu", weights_only=True)
    head = state.get("head.weight")
    if head is None or tuple(head.shape) != (len(categories), EMBEDDING_DIM):
        shape = None if head is None else tuple(head.shape)
        raise BundleError(f"{MODEL_FILE}: head weight {shape}, expected ({len(categories)}, {EMBEDDING_DIM})")
    model = ProductNet(len(categories))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise BundleError(f"{MODEL_FILE} does not fit ProductNet: {error}") from None
    model.eval()
    return Bundle(model=model, index=index, items=items, manifest=manifest)
