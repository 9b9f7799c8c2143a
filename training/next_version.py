"""The next version of a model without retraining (--add, --remove: only new photos are embedded, the index keeps
its quantizer) or with retrained weights (--checkpoint), packed as <name>-v<N>.mar and recorded in
<model store>/<name>.versions.json. Image references are relative to one catalogue image folder (--data-dir,
recorded with each version). Unknown options go to serving.build_archive. See docs/versions.md."""
import argparse
import filecmp
import shutil
import sys
from dataclasses import replace
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np

from serving.build_archive import main as build_archive
from serving.torchserve import MODEL_STORE
from serving.version_record import append_version, changes_path, line_lock, read_record, record_path
from training.build_index import EMBEDDINGS_FILE, embed_catalogue_to_file
from training.calibration import DEFAULT_LISTINGS, TARGET_PRECISION, calibrate_model
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.distributed import Context, pick_device
from training.embedding import embed_items
from training.optimize import catalogue_embedder
from training.parity_gate import rebuild
from training.photo_check import check_photos
from training.publish import publish_bundle, weights_sha256, write_bundle
from visual_search import EMBEDDING_DIM
from visual_search.bundle import CATALOGUE_DIR, MANIFEST_FILE, catalogue_folder, load_bundle
from visual_search.bundle import read_manifest as read_bundle_manifest
from visual_search.catalogue.build import update_catalogue
from visual_search.catalogue.changes import ChangeLog
from visual_search.catalogue.live import ChangeFollower
from visual_search.cli import HelpFormatter
from visual_search.errors import BundleError, CatalogueError
from visual_search.fileio import copy_into, staging_folder, utc_now, write_atomically
from visual_search.items import scan_folder
from visual_search.runtime import Runtime

USAGE = """examples:
  python -m training.next_version --name visual-search --bundle runs/demo/bundle --data-dir data/fashion-mnist/images
  python -m training.next_version --name visual-search --add data/new_photos
  python -m training.next_version --name visual-search --remove sku-17 sku-18
  python -m training.next_version --name visual-search --checkpoint runs/new/best.pt
  python -m training.next_version --name visual-search --compact      # fold the change log into a version
"""

ADDED_EMBEDDINGS_FILE = "added-embeddings.npy"  # beside the new bundle: the vectors of the added photos
NOT_REMEMBERED = ("--catalogue-dir",)  # archive options that name one version's catalogue, not the next one's
SHOWN_IDS = 10  # ids named in a recorded change


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--name", default="visual-search", help="model name (unchanged across versions)")
    p.add_argument("--model-store", default=str(MODEL_STORE))
    p.add_argument("--bundle", default=None, help="source bundle (default: the latest recorded version's)")
    p.add_argument("--add", default=None, help="folder of new photos, <category>/<image file>")
    p.add_argument("--image-prefix", default=None, help="put before each new item's <category>/<file> to make "
                                                        "its image reference a URL, e.g. "
                                                        "https://cdn.example.com/products/ (default: none, the "
                                                        "reference is relative to the catalogue image folder)")
    p.add_argument("--remove", nargs="+", default=[], metavar="ID", help="ids of items to take out")
    p.add_argument("--remove-file", default=None, help="a text file of ids to take out, one a line")
    p.add_argument("--checkpoint", default=None, help="retrained checkpoint: re-embed every item with it")
    p.add_argument("--accept-quality-drop", action="store_true",
                   help="with --checkpoint on a bf16 or int8 catalogue: build it even if the parity gate fails")
    p.add_argument("--compact", action="store_true",
                   help="fold the listings added and removed through the change log (serving.listings) into the "
                        "next version; --add and --remove do this too")
    p.add_argument("--data-dir", default=None, help="the catalogue image folder, which every item's image "
                                                    "reference is relative to; --add copies new photos into it "
                                                    "and --checkpoint re-embeds from it (default: the one "
                                                    "recorded with the latest version, or the bundle's)")
    p.add_argument("--out-dir", default=None, help="new bundle folder (default: <name>-v<N> beside the source)")
    p.add_argument("--note", default="", help="free text added to the recorded change")
    p.add_argument("--embed-batch-size", type=int, default=64)
    p.add_argument("--embed-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    args, archive_options = p.parse_known_args(argv)
    args.archive_options = archive_options
    return args


# ---------------------------------------------------------------------------------------------- the record

def next_number(record):
    return 1 + max((int(float(v["version"])) for v in record["versions"]), default=0)


def remembered(archive_options):
    """The archive options kept for later versions: all but those of NOT_REMEMBERED (with their values)."""
    kept, skip = [], False
    for option in archive_options:
        if skip:
            skip = False
        elif option in NOT_REMEMBERED:
            skip = True
        elif not option.startswith(tuple(f"{name}=" for name in NOT_REMEMBERED)):
            kept.append(option)
    return kept


def pack(args, number, bundle_dir, manifest, change, archive_options, data_dir, undo):
    """Packs `bundle_dir` as version `number` and appends it to the record, the run's commit point; returns the
    record entry."""
    version, archive = f"{number}.0", f"{args.name}-v{number}"
    undo.add(Path(args.model_store) / f"{archive}.mar")
    build_archive(["--bundle", str(bundle_dir), "--name", args.name, "--version", version, "--out-name", archive,
                   "--model-store", args.model_store, *archive_options])
    reference = manifest["catalogue"]
    entry = {
        "version": version, "archive": f"{archive}.mar", "change": change, "items": reference["count"],
        "weights_sha256": manifest["weights_sha256"], "catalogue_uid": reference["uid"],
        "catalogue_manifest_sha256": reference["manifest_sha256"],
        "catalogue_dir": str(catalogue_folder(bundle_dir, manifest).resolve()),
        "bundled": bool(reference.get("bundled")),
        "built": utc_now(), "bundle": str(Path(bundle_dir).resolve()),
        "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
        "archive_options": remembered(archive_options),
    }
    append_version(args.model_store, args.name, entry)
    undo.commit()
    where = "bundled" if entry["bundled"] else f"outside, in {entry['catalogue_dir']}"
    print(f"version {version}: {change} ({entry['items']} items, catalogue {where}) -> "
          f"{Path(args.model_store) / entry['archive']}", flush=True)
    return entry


class Undo:
    """What a run created, removed again if the run fails before its commit (the record's new entry)."""

    def __init__(self):
        self.paths, self.committed = [], False

    def add(self, path):
        self.paths.append(Path(path))
        return path

    def commit(self):
        self.committed = True

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is not None and not self.committed:
            for path in reversed(self.paths):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        return False


def remove_orphans(args, record, number, source_dir):
    """The archive, bundle and catalogue folders of version `number` that a run killed before its commit left
    behind: nothing records them, so nothing serves them; under the line's lock they are removed."""
    recorded = {str(Path(v["bundle"])) for v in record["versions"]} | {v["catalogue_dir"] for v in record["versions"]}
    candidates = [Path(args.model_store) / f"{args.name}-v{number}.mar"]
    if not args.out_dir:
        candidates.append(source_dir.resolve().parent / f"{args.name}-v{number}")
    for path in candidates:
        if path.exists() and str(path.resolve()) not in recorded:
            print(f"removing {path}, left by a run that did not finish", flush=True)
            shutil.rmtree(path) if path.is_dir() else path.unlink()


# ---------------------------------------------------------------------------------------------- images

def image_folder(args, latest, source):
    """The catalogue image folder: --data-dir, else the one recorded with the latest version, else the bundle's."""
    folder = args.data_dir or (latest or {}).get("data_dir") or source.manifest.get("image_root")
    if folder and not Path(folder).is_dir():
        raise FileNotFoundError(f"catalogue image folder not found: {folder}")
    return folder


def need_folder(folder, why):
    if not folder:
        raise ValueError(f"{why} needs the catalogue image folder, which no earlier version recorded: pass "
                         f"--data-dir, the folder every item's image reference is relative to")
    return Path(folder)


def local_image(item):
    """An item's image relative to the catalogue image folder; a URL reference ends in <category>/<file>."""
    if "://" not in item.image:
        return item
    return replace(item, image=f"{item.category}/{PurePosixPath(urlparse(item.image).path).name}")


def check_copies(items, source_root, folder):
    """Refuses, before anything is copied, new photos that would replace a different file in the catalogue image
    folder (an earlier version may still show that file)."""
    clashes = [folder / it.image for it in items
               if (folder / it.image).exists() and not filecmp.cmp(source_root / it.image, folder / it.image, False)]
    if clashes:
        raise ValueError(f"a different file is already in the catalogue image folder: {', '.join(map(str, clashes))}"
                         " (rename the new photo: its file name is its id)")


def copy_into_folder(items, source_root, folder, undo):
    """Copies each new item's photo to <folder>/<category>/<file>, durably and never over another file;
    identical files already there are kept."""
    check_copies(items, source_root, folder)
    for it in items:
        target = folder / it.image
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            photo = source_root / it.image
            write_atomically(target, lambda f, photo=photo: copy_into(photo, f), stat_from=photo)
            undo.add(target)


# ---------------------------------------------------------------------------------------------- the change

def ids_to_remove(args):
    ids = list(args.remove)
    if args.remove_file:
        path = Path(args.remove_file)
        if not path.is_file():
            raise FileNotFoundError(f"--remove-file not found: {path}")
        ids += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(ids))


def named(ids):
    ids = sorted(ids)
    more = f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else ""
    return ", ".join(ids[:SHOWN_IDS]) + more


def check_change(catalogue, source_dir, remove, new_items, vectors):
    """Refuses ids to remove that are not live, new ids that are live (unless removed in the same run, or the same
    listing a killed run already wrote to the log and did not fold: those are left out), and a change that would
    leave no item. Returns the new items and their vectors that are still to add."""
    unknown = [i for i in remove if not catalogue.contains(i)]
    if unknown:
        raise ValueError(f"not in the catalogue of {source_dir}: {named(unknown)}")
    removing, todo, clashes = set(remove), [], []
    for item, vector in zip(new_items, vectors):
        if item.id in removing or not catalogue.contains(item.id):
            todo.append((item, vector))
            continue
        key, live = catalogue.listing(item.id)
        unfolded = catalogue.overlay is not None and key >= catalogue.overlay.key_space
        if not unfolded or live.category != item.category or not np.allclose(catalogue.vector(item.id), vector,
                                                                              atol=1e-5):
            clashes.append(item.id)
    if clashes:
        raise ValueError(f"ids already in the catalogue: {named(clashes)} (remove them first to replace)")
    if catalogue.live_count - len(remove) + len(todo) <= 0:
        raise ValueError("removing every item would leave an empty catalogue")
    return todo


def new_catalogue_folder(source, out_dir, name, number):
    """<out_dir>/catalogue when the source bundles its catalogue; else <source catalogue's parent>/<name>-v<N>
    (with "-catalogue" added if that is the new bundle folder or holds it, or is held by it)."""
    if source.manifest["catalogue"].get("bundled"):
        return out_dir / CATALOGUE_DIR
    folder = source.catalogue.folder.resolve().parent / f"{name}-v{number}"
    bundle = out_dir.resolve()
    if folder == bundle or folder in bundle.parents or bundle in folder.parents:
        folder = folder.with_name(f"{folder.name}-catalogue")
    return folder


def refuse_existing(out_dir, folder):
    if (out_dir / MANIFEST_FILE).exists():
        raise FileExistsError(f"{out_dir} already holds a bundle: choose another --out-dir")
    if folder.exists():
        raise FileExistsError(f"{folder} exists: a catalogue folder is written once; move it away or choose "
                              f"another --out-dir")


def index_plan(catalogue_manifest):
    """The source catalogue's index choice, for a fresh catalogue: its profile (sized anew for the count), or its
    factory string and search parameters when it was a custom one."""
    if catalogue_manifest["profile"] == "custom":
        return {"factory": catalogue_manifest["factory"], "search": catalogue_manifest["search"]}
    return {"profile": catalogue_manifest["profile"]}


def embed_photos(args, source, root, items, out_dir):
    """Checks that every photo decodes (listing the ones that do not), then embeds them as the source's catalogue
    was embedded (its runtime, with the bundle's IR): float32 [len(items), 2048]."""
    ctx = Context(device=pick_device(args.device))
    check_photos(ctx, root, items, out_dir, size=source.preprocess.image_size, workers=args.embed_workers)
    settings, _ = catalogue_embedder(source)
    runtime = Runtime(source, "cpu" if settings.engine == "openvino" else ctx.device, settings)
    embeddings, _ = embed_items(runtime, root, items, source.categories, args.embed_batch_size, args.embed_workers,
                                desc="embedding new photos")
    return embeddings


def folded(catalogue, log, until, weights):
    """(adds as Changes, ids to take out of the sealed catalogue) that fold the log's changes after what the
    catalogue holds, up to `until`: the last change of each id wins."""
    last = {}
    for change in log.since(int(catalogue.manifest.get("changes_folded", 0)), until):
        last[change.id] = change
    adds = [change for change in last.values() if change.op == "add"]
    foreign = [change.id for change in adds if change.weights != weights]
    if foreign:
        raise ValueError(f"the change log holds additions embedded by other weights ({named(foreign)}): build "
                         f"this version with --checkpoint, which embeds every listing again")
    sealed = catalogue.items.keys_of(list(last))
    return adds, [item_id for item_id in last if item_id in sealed]


def write_vectors(path, changes):
    """The vectors of `changes` as a float32 .npy [len, 2048], written row by row (bounded memory)."""
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(changes), EMBEDDING_DIM))
    for row, change in enumerate(changes):
        rows[row] = change.vector
    rows.flush()
    del rows
    return path


def folded_in_place(args, source, log, until, out_dir, folder, new_catalogue, notes):
    """The source's catalogue updated into `new_catalogue` with the log's changes up to `until`: only new photos
    were embedded; the quantizer and the old vectors are kept."""
    adds, remove = folded(source.catalogue, log, until, source.manifest["weights_sha256"])
    vectors = write_vectors(out_dir / ADDED_EMBEDDINGS_FILE, adds) if adds else None
    settings, ir = catalogue_embedder(source)  # the log's rows were embedded as the catalogue's were
    update_catalogue(source.catalogue.folder, new_catalogue, add_items=[change.item for change in adds],
                     add_embeddings=vectors, remove_ids=remove, notes=notes, changes_folded=until,
                     runtime=settings.record())
    return write_bundle(out_dir, model=source.model.cpu(), categories=source.categories,
                        preprocess=source.preprocess, catalogue_dir=new_catalogue, normalize=source.normalize,
                        runtime=source.manifest.get("runtime"), notes=notes, image_root=folder, ir=ir,
                        parity=source.manifest.get("parity"))


def recalibrated(args, source, model, preprocess, embeddings, items, folder, choice):
    """The near-duplicate calibration for retrained weights, on the held-out photos the source catalogue was
    calibrated on; None (and a warning) when it was not calibrated or those photos are gone."""
    record = source.catalogue.manifest.get("duplicates") or {}
    photos = record.get("photos") or {}
    if not photos.get("list") or not Path(photos["list"]).is_file() or not Path(photos.get("data_dir", "")).is_dir():
        print("warning: no near-duplicate calibration for the new weights: the source catalogue names no held-out "
              "photos that are still there; requests with duplicates=true must then give duplicate_threshold")
        return None
    return calibrate_model(model, preprocess, source.normalize, pick_device(args.device), photos["list"],
                           photos["data_dir"], embeddings, items, weights_sha256(model.cpu()),
                           photos.get("listings", DEFAULT_LISTINGS), record.get("target_precision", TARGET_PRECISION),
                           record.get("seed", 0), image_root=folder, settings=choice.settings, ir=choice.ir)


def re_embedded(args, source, log, until, out_dir, folder, new_catalogue, notes):
    """--checkpoint: every live listing embedded with the retrained weights from the catalogue image folder,
    published as a fresh catalogue with the source's index profile, holding the log up to `until`."""
    model, categories, preprocess = model_from_checkpoint(load_checkpoint(args.checkpoint))
    items = source.catalogue.all_items()
    path = out_dir / EMBEDDINGS_FILE
    ctx = Context(device=pick_device(args.device))
    local = [local_image(it) for it in items]
    check_photos(ctx, folder, local, out_dir, size=preprocess.image_size, workers=args.embed_workers)
    # the catalogue's runtime again, its IR made from the new weights and admitted by the parity gate
    choice = rebuild(catalogue_embedder(source)[0].name, model, preprocess, source.normalize, folder, local,
                     categories, ctx.device, args.embed_batch_size, args.embed_workers, args.accept_quality_drop)
    embed_catalogue_to_file(ctx, path, model, folder, local, categories, preprocess, source.normalize,
                            args.embed_batch_size, args.embed_workers, choice.settings, choice.ir)
    bundled = source.manifest["catalogue"].get("bundled")
    duplicates = recalibrated(args, source, model, preprocess, path, local, folder, choice)
    return publish_bundle(out_dir, model=model.cpu(), categories=categories, preprocess=preprocess, items=items,
                          embeddings=path, normalize=source.normalize,
                          catalogue_dir=None if bundled else new_catalogue, **index_plan(source.catalogue.manifest),
                          runtime=source.manifest.get("runtime"), notes=notes, image_root=folder, changes_folded=until,
                          catalogue_runtime=choice.catalogue_runtime, ir=choice.ir, parity=choice.parity,
                          duplicates=duplicates)


def update(args):
    store = Path(args.model_store)
    fresh = not store.exists()
    try:
        return update_line(args, store)
    except BaseException:
        if fresh:
            remove_lock_only_store(store, args.name)
        raise


def remove_lock_only_store(store, name):
    """Removes a model store this run created if it holds nothing but the line's lock file."""
    lock = store / f".{name}.lock"
    if store.is_dir() and all(path == lock for path in store.iterdir()):
        lock.unlink(missing_ok=True)
        store.rmdir()


def update_line(args, store):
    with line_lock(store, args.name):
        record = read_record(store, args.name)
        latest = record["versions"][-1] if record["versions"] else None
        if not args.bundle and not latest:
            raise ValueError(f"no versions recorded in {record_path(store, args.name)}: pass --bundle, the current "
                             f"bundle")
        source_dir = Path(args.bundle or latest["bundle"])
        remove_orphans(args, record, next_number(record), source_dir)
        source = load_bundle(source_dir)
        try:
            return update_from(args, record, latest, source_dir, source)
        finally:
            source.catalogue.close()


def update_from(args, record, latest, source_dir, source):
    folder = image_folder(args, latest, source)
    archive_options = args.archive_options
    if latest and not remembered(archive_options):  # none given, or only this version's --catalogue-dir
        archive_options = latest["archive_options"] + archive_options
    remove = ids_to_remove(args)
    new_items = scan_folder(args.add) if args.add else []
    if args.add:
        folder = need_folder(folder, "--add")
        check_copies(new_items, Path(args.add), folder)
    if args.checkpoint:
        folder = need_folder(folder, "--checkpoint")
    first = latest is None
    if first:  # the source becomes version 1, so that there is something to roll back to
        with Undo() as undo:
            latest = pack(args, 1, source_dir, source.manifest, f"initial catalogue from {source_dir}",
                          archive_options, folder, undo)
        record = read_record(args.model_store, args.name)
    if not (args.add or remove or args.checkpoint or args.compact):
        if first:
            return latest
        raise ValueError("nothing to change: pass --add, --remove, --checkpoint or --compact")

    weights = source.manifest["weights_sha256"]
    log = ChangeLog(changes_path(args.model_store, args.name), write=True, line=args.name)
    try:
        follower = ChangeFollower(source.catalogue, log.path, weights)  # the source as served now: sealed plus log
        number = next_number(record)
        out_dir = Path(args.out_dir) if args.out_dir else source_dir.parent / f"{args.name}-v{number}"
        new_catalogue = new_catalogue_folder(source, out_dir, args.name, number)
        refuse_existing(out_dir, new_catalogue)
        with Undo() as undo:
            vectors = embed_photos(args, source, Path(args.add), new_items, out_dir.parent) if new_items else []
            todo = check_change(source.catalogue, source_dir, remove, new_items, vectors)  # before anything is written
            copy_into_folder([item for item, _ in todo], Path(args.add), folder, undo) if todo else None
            added = [(replace(item, image=args.image_prefix + item.image) if args.image_prefix else item, vector)
                     for item, vector in todo]
            sealed = source.catalogue.items.keys_of
            log.append(remove, added, weights, in_base=lambda item_id: item_id in sealed([item_id]))
            undo.commit()  # the changes are live now, on every version of the line
        follower.refresh()
        until = follower.applied
        if until == int(source.catalogue.manifest.get("changes_folded", 0)) and not args.checkpoint:
            raise ValueError(f"nothing to fold: the change log holds no change after what {source_dir} holds")
        return build_version(args, source, log, until, number, out_dir, new_catalogue, folder, archive_options,
                             latest, remove, new_items)
    finally:
        log.close()


def build_version(args, source, log, until, number, out_dir, new_catalogue, folder, archive_options, latest,
                  remove, new_items):
    """The next version, holding the log up to `until`: a bundle staged and renamed, its archive, then the record."""
    changes = [f"retrained weights from {args.checkpoint}"] if args.checkpoint else []
    if remove:
        changes.append(f"removed {len(remove)} item(s): {named(remove)}")
    if new_items:
        changes.append(f"added {len(new_items)} item(s) from {args.add}, copied into {folder}")
    unfolded = until - int(source.catalogue.manifest.get("changes_folded", 0))
    changes.append(f"folded the change log up to {until} ({unfolded} change(s))")
    if args.note:
        changes.append(args.note)
    notes = f"version {number}.0 from {latest['version']}: {'; '.join(changes)}"
    make = re_embedded if args.checkpoint else folded_in_place
    with Undo() as undo:
        if not source.manifest["catalogue"].get("bundled"):
            undo.add(new_catalogue)
        undo.add(out_dir)
        with staging_folder(out_dir) as staged:
            staged_catalogue = staged / CATALOGUE_DIR if source.manifest["catalogue"].get("bundled") else new_catalogue
            make(args, source, log, until, staged, folder, staged_catalogue, notes)
        manifest = read_bundle_manifest(out_dir)
        return pack(args, number, out_dir, manifest, "; ".join(changes), archive_options, folder, undo)


def main(argv=None):
    args = get_args(argv)
    try:
        return update(args)
    except (BundleError, CatalogueError, ValueError, FileNotFoundError, FileExistsError, BlockingIOError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
