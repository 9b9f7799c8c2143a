"""Writing bundles: the weights, the OpenVINO IR of the runtime and the manifest for a published catalogue folder,
or a catalogue published from embeddings and its bundle in one step (visual_search.bundle reads them)."""
import hashlib
import io
from pathlib import Path

import torch

from training.optimize import write_ir
from visual_search import ARCHIVE_FORMAT_VERSION, EMBEDDING_DIM
from visual_search.bundle import CATALOGUE_DIR, MANIFEST_FILE, MODEL_FILE, check_runtime
from visual_search.catalogue import catalogue_reference, publish_catalogue, read_manifest
from visual_search.errors import BundleError
from visual_search.fileio import sha256_file, utc_now, write_atomically, write_json
from visual_search.openvino_engine import IR_BIN, IR_XML
from visual_search.runtime_settings import RuntimeSettings, check_catalogue_runtime


def weights_sha256(model):
    """The sha256 that the bundle's model.pt of `model` has: torch.save to a file object writes the same bytes for
    the same weights, so a calibration can name the weights before the bundle is written."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def write_bundle(out_dir, *, model, categories, preprocess, catalogue_dir, normalize, runtime=None, notes="",
                 image_root=None, ir=None, parity=None):
    """Writes model.pt, the IR (`ir`: a training.optimize.Ir, for the openvino engine) and manifest.json for the
    catalogue folder `catalogue_dir` (already published: inside out_dir as "catalogue" to bundle it, anywhere else
    to keep it outside), whose vectors must be the runtime's. `image_root`, the folder the items' image references
    are relative to, is recorded for later catalogue updates (training.next_version); `parity`, the gate's record."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = catalogue_reference(catalogue_dir)
    if reference["normalized"] != bool(normalize):
        raise BundleError(f"{catalogue_dir} holds {'unit-length' if reference['normalized'] else 'raw'} vectors; "
                          f"the bundle would embed queries {'unit-length' if normalize else 'raw'}")
    settings = RuntimeSettings.from_dict(runtime or {})
    check_catalogue_runtime(read_manifest(catalogue_dir), settings, where="this bundle's runtime")
    bundled = Path(catalogue_dir).resolve() == (out_dir / CATALOGUE_DIR).resolve()
    write_atomically(out_dir / MODEL_FILE, lambda f: torch.save(model.state_dict(), f), replace=True)
    if ir is None:
        for name in (IR_XML, IR_BIN):
            (out_dir / name).unlink(missing_ok=True)
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
        "runtime": settings.to_dict(),
        "openvino": write_ir(ir, out_dir) if ir is not None else None,
        "parity": parity,
        "weights_sha256": weights,
        "catalogue": {**reference, "bundled": bundled, "path": CATALOGUE_DIR if bundled else reference["path"]},
        "image_root": str(Path(image_root).resolve()) if image_root else None,
        "torch_version": torch.__version__,
        "created": utc_now(),
        "notes": notes,
    }
    check_runtime(out_dir, manifest)
    write_json(out_dir / MANIFEST_FILE, manifest, replace=True)
    return manifest


def publish_bundle(out_dir, *, model, categories, preprocess, items, embeddings, normalize, catalogue_dir=None,
                   profile=None, factory=None, search=None, runtime=None, notes="", image_root=None, progress=True,
                   changes_folded=0, catalogue_runtime=None, ir=None, parity=None, duplicates=None):
    """Publishes a catalogue from `embeddings` (a .npy path or an array, rows in `items` order, embedded by
    `catalogue_runtime`, a record; default: the bundle's runtime) and writes the bundle for it. The catalogue goes
    to <out_dir>/catalogue (bundled) or to `catalogue_dir` (outside); either is written once and never replaced.
    `duplicates`: its near-duplicate calibration (training.calibration)."""
    out_dir = Path(out_dir)
    target = Path(catalogue_dir) if catalogue_dir else out_dir / CATALOGUE_DIR
    if catalogue_runtime is None:
        catalogue_runtime = RuntimeSettings.from_dict(runtime or {}).embeds_like()
    publish_catalogue(target, embeddings, items, categories=categories, profile=profile, factory=factory,
                      search=search, normalize=normalize, progress=progress, notes=notes,
                      changes_folded=changes_folded, runtime=catalogue_runtime, duplicates=duplicates)
    return write_bundle(out_dir, model=model, categories=categories, preprocess=preprocess, catalogue_dir=target,
                        normalize=normalize, runtime=runtime, notes=notes, image_root=image_root, ir=ir,
                        parity=parity)
