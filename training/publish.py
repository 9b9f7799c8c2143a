"""Writing bundles: the weights and manifest for a published catalogue folder, or a catalogue published from
embeddings and its bundle in one step (visual_search.bundle reads them)."""
import hashlib
import io
import shutil
from pathlib import Path

import torch

from visual_search import ARCHIVE_FORMAT_VERSION, EMBEDDING_DIM
from visual_search.bundle import CATALOGUE_DIR, MANIFEST_FILE, MODEL_FILE
from visual_search.catalogue import catalogue_reference, publish_catalogue, read_manifest
from visual_search.errors import BundleError
from visual_search.fileio import sha256_file, utc_now, write_atomically, write_json
from visual_search.runtime import RuntimeSettings


def weights_sha256(model):
    """The sha256 that the bundle's model.pt of `model` has: torch.save to a file object writes the same bytes for
    the same weights, so a calibration can name the weights before the bundle is written."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def write_bundle(out_dir, *, model, categories, preprocess, catalogue_dir, normalize, runtime=None, notes="",
                 image_root=None):
    """Writes model.pt and manifest.json for the catalogue folder `catalogue_dir` (already published: inside
    out_dir as "catalogue" to bundle it, anywhere else to keep it outside). `image_root`, the folder the items'
    image references are relative to, is recorded for later catalogue updates (training.next_version)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = catalogue_reference(catalogue_dir)
    if reference["normalized"] != bool(normalize):
        raise BundleError(f"{catalogue_dir} holds {'unit-length' if reference['normalized'] else 'raw'} vectors; "
                          f"the bundle would embed queries {'unit-length' if normalize else 'raw'}")
    bundled = Path(catalogue_dir).resolve() == (out_dir / CATALOGUE_DIR).resolve()
    write_atomically(out_dir / MODEL_FILE, lambda f: torch.save(model.state_dict(), f), replace=True)
    weights = sha256_file(out_dir / MODEL_FILE)
    calibrated_for = (read_manifest(catalogue_dir).get("duplicates") or {}).get("weights_sha256")
    if calibrated_for not in (None, weights):
        raise BundleError(f"{catalogue_dir}: its near-duplicate threshold was calibrated for weights "
                          f"{calibrated_for[:12]}..., not these ({weights[:12]}...): publish the catalogue again "
                          f"with these weights")
    manifest = {
        "format_version": ARCHIVE_FORMAT_VERSION,
        "embedding_dim": EMBEDDING_DIM,
        "categories": list(categories),
        "normalize_embeddings": bool(normalize),
        "preprocess": preprocess.to_dict(),
        "runtime": RuntimeSettings.from_dict(runtime or {}).to_dict(),
        "weights_sha256": weights,
        "catalogue": {**reference, "bundled": bundled, "path": CATALOGUE_DIR if bundled else reference["path"]},
        "image_root": str(Path(image_root).resolve()) if image_root else None,
        "torch_version": torch.__version__,
        "created": utc_now(),
        "notes": notes,
    }
    write_json(out_dir / MANIFEST_FILE, manifest, replace=True)
    return manifest


def publish_bundle(out_dir, *, model, categories, preprocess, items, embeddings, normalize, catalogue_dir=None,
                   profile=None, factory=None, search=None, runtime=None, notes="", image_root=None, progress=True,
                   duplicates=None):
    """Publishes a catalogue from `embeddings` (a .npy path or an array, rows in `items` order) and writes the
    bundle for it. The catalogue goes to <out_dir>/catalogue (bundled; replaced if there) or to `catalogue_dir`
    (outside; written once, never replaced). `duplicates`: its near-duplicate calibration (training.calibration)."""
    out_dir = Path(out_dir)
    target = Path(catalogue_dir) if catalogue_dir else out_dir / CATALOGUE_DIR
    if not catalogue_dir and target.exists():
        shutil.rmtree(target)  # the bundle's own catalogue, rebuilt with it
    publish_catalogue(target, embeddings, items, categories=categories, profile=profile, factory=factory,
                      search=search, normalize=normalize, progress=progress, notes=notes, duplicates=duplicates)
    return write_bundle(out_dir, model=model, categories=categories, preprocess=preprocess, catalogue_dir=target,
                        normalize=normalize, runtime=runtime, notes=notes, image_root=image_root)
