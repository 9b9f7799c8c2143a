"""The search bundle: the model, its manifest and the catalogue it searches, written together, checked together.

    model.pt          ProductNet state dict (torch's zip format, loaded with weights_only=True)
    manifest.json     categories, preprocessing, runtime settings, the weights' sha256, and the reference of the
                      catalogue folder it was built for (visual_search.catalogue_store.catalogue_reference)
    catalogue/        the catalogue folder (visual_search.catalogue_store), when it is bundled; a large catalogue
                      lives outside the bundle and archive, named by the manifest or by model-config.yaml

Where the catalogue is looked for, first match wins: the folder passed to load_bundle (model-config.yaml's
handler.catalogue_dir; a relative path is taken under $VISUAL_SEARCH_CATALOGUES), <bundle>/catalogue, then the
path the manifest recorded. Whichever it is, it must be the catalogue of the manifest's reference.
"""
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ARCHIVE_FORMAT_VERSION, EMBEDDING_DIM
from .catalogue_build import publish_catalogue
from .catalogue_files import CatalogueError, read_manifest as read_catalogue_manifest
from .catalogue_store import catalogue_reference, open_catalogue
from .model import ProductNet
from .preprocessing import PreprocessSettings

MODEL_FILE, MANIFEST_FILE, CATALOGUE_DIR = "model.pt", "manifest.json", "catalogue"
BUNDLE_FILES = (MODEL_FILE, MANIFEST_FILE)
CATALOGUES_ENV = "VISUAL_SEARCH_CATALOGUES"
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
    catalogue: object  # visual_search.catalogue_store.Catalogue
    manifest: dict

    @property
    def categories(self):
        """The model's classes, in the order of its head."""
        return self.manifest["categories"]

    @property
    def preprocess(self):
        return PreprocessSettings.from_dict(self.manifest["preprocess"])

    @property
    def normalize(self):
        return self.manifest["normalize_embeddings"]


def write_bundle(out_dir, *, model, categories, preprocess, catalogue_dir, normalize, runtime=None, notes="",
                 image_root=None):
    """Writes model.pt and manifest.json for the catalogue folder `catalogue_dir` (already published: inside
    out_dir as "catalogue" to bundle it, anywhere else to keep it outside). `image_root`, the folder the items'
    image references are relative to, is recorded for later catalogue updates (training.update_catalogue)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = catalogue_reference(catalogue_dir)
    if reference["normalized"] != bool(normalize):
        raise BundleError(f"{catalogue_dir} holds {'unit-length' if reference['normalized'] else 'raw'} vectors; "
                          f"the bundle would embed queries {'unit-length' if normalize else 'raw'}")
    bundled = Path(catalogue_dir).resolve() == (out_dir / CATALOGUE_DIR).resolve()
    torch.save(model.state_dict(), out_dir / MODEL_FILE)
    catalogue_manifest = read_catalogue_manifest(catalogue_dir)
    manifest = {
        "format_version": ARCHIVE_FORMAT_VERSION,
        "embedding_dim": EMBEDDING_DIM,
        "categories": list(categories),
        "catalogue_categories": catalogue_manifest["categories"],
        "num_items": reference["count"],
        "index_profile": catalogue_manifest["profile"],
        "index_factory": catalogue_manifest["factory"],
        "normalize_embeddings": bool(normalize),
        "preprocess": preprocess.to_dict(),
        "runtime": {**DEFAULT_RUNTIME, **(runtime or {})},
        "weights_sha256": sha256(out_dir / MODEL_FILE),
        "catalogue": {**reference, "bundled": bundled, "path": CATALOGUE_DIR if bundled else reference["path"]},
        "image_root": str(Path(image_root).resolve()) if image_root else None,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "notes": notes,
    }
    partial = out_dir / f".{MANIFEST_FILE}.partial"
    partial.write_text(json.dumps(manifest, indent=2))
    partial.replace(out_dir / MANIFEST_FILE)
    return manifest


def publish_bundle(out_dir, *, model, categories, preprocess, items, embeddings, normalize, catalogue_dir=None,
                   profile=None, factory=None, search=None, runtime=None, notes="", image_root=None, progress=True):
    """Publishes a catalogue from `embeddings` (a .npy path or an array, rows in `items` order) and writes the
    bundle for it. The catalogue goes to <out_dir>/catalogue (bundled; replaced if there) or to `catalogue_dir`
    (outside; written once, never replaced)."""
    out_dir = Path(out_dir)
    target = Path(catalogue_dir) if catalogue_dir else out_dir / CATALOGUE_DIR
    if not catalogue_dir and target.exists():
        shutil.rmtree(target)  # the bundle's own catalogue, rebuilt with it
    publish_catalogue(target, embeddings, items, categories=categories, profile=profile, factory=factory,
                      search=search, normalize=normalize, progress=progress, notes=notes)
    return write_bundle(out_dir, model=model, categories=categories, preprocess=preprocess, catalogue_dir=target,
                        normalize=normalize, runtime=runtime, notes=notes, image_root=image_root)


def read_manifest(bundle_dir):
    path = Path(bundle_dir) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{path} is missing")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != ARCHIVE_FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {manifest.get('format_version')!r}, this code reads "
                          f"{ARCHIVE_FORMAT_VERSION}: rebuild the bundle with training.build_index")
    if manifest.get("embedding_dim") != EMBEDDING_DIM:
        raise BundleError(f"{path}: embedding_dim {manifest.get('embedding_dim')}, expected {EMBEDDING_DIM}")
    return manifest


def catalogue_folder(bundle_dir, manifest, override=None):
    """Where the bundle's catalogue is: `override` (relative: under $VISUAL_SEARCH_CATALOGUES), the bundled
    folder, or the path recorded in the manifest."""
    if override:
        path = Path(os.path.expandvars(str(override)))
        if not path.is_absolute():
            path = Path(os.environ.get(CATALOGUES_ENV, ".")) / path
        return path
    reference = manifest["catalogue"]
    if reference.get("bundled"):
        return Path(bundle_dir) / CATALOGUE_DIR
    return Path(reference["path"])


def load_model(bundle_dir, manifest, verify_checksum=True):
    path = Path(bundle_dir) / MODEL_FILE
    if verify_checksum and sha256(path) != manifest.get("weights_sha256"):
        raise BundleError(f"{MODEL_FILE} does not match the checksum in {MANIFEST_FILE}")
    categories = manifest["categories"]
    state = torch.load(path, map_location="cpu", weights_only=True)
    head = state.get("head.weight")
    if head is None or tuple(head.shape) != (len(categories), EMBEDDING_DIM):
        shape = None if head is None else tuple(head.shape)
        raise BundleError(f"{MODEL_FILE}: head weight {shape}, expected ({len(categories)}, {EMBEDDING_DIM})")
    model = ProductNet(len(categories))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise BundleError(f"{MODEL_FILE} does not fit ProductNet: {error}") from None
    return model.eval()


def load_bundle(bundle_dir, catalogue_dir=None, verify_checksums=True, mmap=True):
    """Loads the model and opens its catalogue (memory-mapped, cheaply checked against the manifest's reference);
    raises BundleError naming the first mismatch."""
    bundle_dir = Path(bundle_dir)
    missing = [name for name in BUNDLE_FILES if not (bundle_dir / name).is_file()]
    if missing:
        raise BundleError(f"{bundle_dir} lacks {', '.join(missing)}")
    manifest = read_manifest(bundle_dir)
    categories = manifest["categories"]
    if not categories or len(set(categories)) != len(categories):
        raise BundleError(f"categories must be a non-empty list of distinct names, got {categories}")
    PreprocessSettings.from_dict(manifest["preprocess"])
    model = load_model(bundle_dir, manifest, verify_checksums)
    folder = catalogue_folder(bundle_dir, manifest, catalogue_dir)
    if not folder.is_dir():
        raise BundleError(f"catalogue folder {folder} not found (this archive expects catalogue "
                          f"{manifest['catalogue']['uid']} with {manifest['catalogue']['count']} items)")
    try:
        catalogue = open_catalogue(folder, mmap=mmap, expect=manifest["catalogue"])
    except CatalogueError as error:
        raise BundleError(str(error)) from None
    return Bundle(model=model, catalogue=catalogue, manifest=manifest)
