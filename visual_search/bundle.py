"""A bundle: model.pt (a state dict, loaded with weights_only=True), manifest.json (categories, preprocessing,
runtime, the weights' sha256, the reference of its catalogue), for the openvino engine an IR (model.xml + model.bin,
with their sha256) and the catalogue folder, bundled or outside. The read side, checked at load; training.publish
writes bundles."""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ARCHIVE_FORMAT_VERSION, EMBEDDING_DIM
from .catalogue import open_catalogue
from .catalogue.milvus import MilvusSettings, open_collection
from .errors import BundleError, CatalogueError
from .fileio import sha256_file, under_catalogues
from .model import ProductNet
from .openvino_engine import IR_BIN, IR_XML
from .preprocessing import PreprocessSettings
from .runtime_settings import RuntimeSettings

MODEL_FILE, MANIFEST_FILE, CATALOGUE_DIR = "model.pt", "manifest.json", "catalogue"
BUNDLE_FILES = (MODEL_FILE, MANIFEST_FILE)


@dataclass
class Bundle:
    model: ProductNet
    catalogue: object  # visual_search.catalogue.Catalogue
    manifest: dict
    folder: Path = None

    @property
    def runtime(self):
        return RuntimeSettings.from_dict(self.manifest["runtime"])

    @property
    def ir(self):
        """The path of the OpenVINO IR's model.xml, or None when the bundle carries none."""
        return self.folder / IR_XML if self.manifest.get("openvino") else None

    @property
    def ir_precision(self):
        return (self.manifest.get("openvino") or {}).get("precision")

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
        return under_catalogues(override)
    reference = manifest["catalogue"]
    if reference.get("bundled"):
        return Path(bundle_dir) / CATALOGUE_DIR
    return Path(reference["path"])


def bundle_files(manifest):
    """The files of a bundle beside its catalogue: the weights, the manifest and the IR files it lists."""
    return (*BUNDLE_FILES, *((manifest.get("openvino") or {}).get("files") or {}))


def check_runtime(bundle_dir, manifest, verify_checksums=True):
    """The runtime section is valid, and the OpenVINO IR it needs is there, as listed, with its sha256."""
    try:
        settings = RuntimeSettings.from_dict(manifest.get("runtime") or {})
    except (TypeError, ValueError) as error:
        raise BundleError(f"{MANIFEST_FILE}: runtime section {manifest.get('runtime')}: {error}") from None
    ir = manifest.get("openvino")
    if ir:
        if set(ir.get("files") or {}) != {IR_XML, IR_BIN} or ir.get("precision") not in ("fp32", "int8"):
            raise BundleError(f"{MANIFEST_FILE}: the openvino section lists {sorted(ir.get('files') or {})} at "
                              f"precision {ir.get('precision')!r}, expected {IR_XML} and {IR_BIN} at fp32 or int8")
        for name, digest in ir["files"].items():
            path = Path(bundle_dir) / name
            if not path.is_file():
                raise BundleError(f"{bundle_dir} lacks {name}, the OpenVINO IR its manifest lists")
            if verify_checksums and sha256_file(path) != digest:
                raise BundleError(f"{name} does not match the checksum in {MANIFEST_FILE}")
    if settings.engine == "openvino":
        if not ir:
            raise BundleError(f"{MANIFEST_FILE}: the runtime is openvino but the bundle carries no OpenVINO IR")
        if (settings.precision == "int8") != (ir["precision"] == "int8"):
            raise BundleError(f"{MANIFEST_FILE}: the runtime is openvino {settings.precision} but the IR is "
                              f"{ir['precision']} (an int8 IR serves int8, an fp32 one fp32 and bf16)")
    return settings


def load_model(bundle_dir, manifest, verify_checksum=True):
    path = Path(bundle_dir) / MODEL_FILE
    if verify_checksum and sha256_file(path) != manifest.get("weights_sha256"):
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


def load_bundle(bundle_dir, catalogue_dir=None, verify_checksums=True, mmap=True, milvus=None):
    """Loads the model and opens its catalogue (memory-mapped, cheaply checked against the manifest's reference);
    raises BundleError naming the first mismatch. `milvus` (a MilvusSettings or its dict): the catalogue is that
    collection instead of a folder, checked against the same reference; an archive whose reference names a
    collection needs it."""
    bundle_dir = Path(bundle_dir)
    missing = [name for name in BUNDLE_FILES if not (bundle_dir / name).is_file()]
    if missing:
        raise BundleError(f"{bundle_dir} lacks {', '.join(missing)}")
    manifest = read_manifest(bundle_dir)
    categories = manifest["categories"]
    if not categories or len(set(categories)) != len(categories):
        raise BundleError(f"categories must be a non-empty list of distinct names, got {categories}")
    PreprocessSettings.from_dict(manifest["preprocess"])
    check_runtime(bundle_dir, manifest, verify_checksums)
    model = load_model(bundle_dir, manifest, verify_checksums)
    if milvus is not None or manifest["catalogue"].get("engine") == "milvus":
        return Bundle(model=model, catalogue=open_milvus(manifest["catalogue"], milvus), manifest=manifest)
    folder = catalogue_folder(bundle_dir, manifest, catalogue_dir)
    if not folder.is_dir():
        raise BundleError(f"catalogue folder {folder} not found (this archive expects catalogue "
                          f"{manifest['catalogue']['uid']} with {manifest['catalogue']['count']} items)")
    try:
        catalogue = open_catalogue(folder, mmap=mmap, expect=manifest["catalogue"])
    except CatalogueError as error:
        raise BundleError(str(error)) from None
    return Bundle(model=model, catalogue=catalogue, manifest=manifest, folder=bundle_dir)


def open_milvus(reference, settings):
    """The MilvusCatalogue of `settings`, checked against the bundle's catalogue reference: all of it when that
    names a collection (an archive's), its dimension and normalisation when it names a folder (a bundle's: the
    collection was published from that folder, or from the same model's embeddings)."""
    if settings is None:
        raise BundleError(f"this archive searches Milvus collection {reference.get('collection')!r}: its "
                          f"model-config.yaml needs handler.milvus (uri, collection)")
    if not isinstance(settings, MilvusSettings):
        settings = MilvusSettings.from_dict(settings)
    try:
        expect = reference if reference.get("engine") == "milvus" else \
            {key: reference[key] for key in ("dim", "normalized") if key in reference}
        return open_collection(settings, expect=expect)
    except CatalogueError as error:
        raise BundleError(str(error)) from None
