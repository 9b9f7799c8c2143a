"""The next version of a model without retraining (--add, --remove: only new photos are embedded, the index keeps
its quantizer) or with retrained weights (--checkpoint), packed as <name>-v<N>.mar and recorded in
<model store>/<name>.versions.json. Image references are relative to one catalogue image folder (--data-dir,
recorded with each version). Unknown options go to serving.build_archive. See docs/versions.md."""
import argparse
import filecmp
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from serving.build_archive import main as build_archive
from serving.torchserve import MODEL_STORE
from training.build_index import EMBEDDINGS_FILE, embed_catalogue_to_file
from training.calibration import DEFAULT_LISTINGS, TARGET_PRECISION, calibrate_model
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.distributed import Context, pick_device
from training.photo_check import check_photos
from training.publish import publish_bundle, weights_sha256, write_bundle
from visual_search.bundle import CATALOGUE_DIR, MANIFEST_FILE, catalogue_folder, load_bundle
from visual_search.catalogue.build import update_catalogue
from visual_search.cli import HelpFormatter
from visual_search.errors import BundleError
from visual_search.fileio import utc_now, write_json
from visual_search.items import scan_folder

USAGE = """examples:
  python -m training.next_version --name visual-search --bundle runs/demo/bundle --data-dir data/fashion-mnist/images
  python -m training.next_version --name visual-search --add data/new_photos
  python -m training.next_version --name visual-search --remove sku-17 sku-18
  python -m training.next_version --name visual-search --checkpoint runs/new/best.pt
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

def record_path(args):
    return Path(args.model_store) / f"{args.name}.versions.json"


def read_record(args):
    path = record_path(args)
    if not path.is_file():
        return {"model": args.name, "versions": []}
    record = json.loads(path.read_text())
    if record.get("model") != args.name:
        raise ValueError(f"{path} records model {record.get('model')!r}, not {args.name!r}")
    return record


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


def pack(args, record, bundle_dir, manifest, change, archive_options, data_dir):
    """Packs `bundle_dir` as the next version and appends it to the record; returns the record entry."""
    number = next_number(record)
    version, archive = f"{number}.0", f"{args.name}-v{number}"
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
    record["versions"].append(entry)
    write_json(record_path(args), record, replace=True)
    where = "bundled" if entry["bundled"] else f"outside, in {entry['catalogue_dir']}"
    print(f"version {version}: {change} ({entry['items']} items, catalogue {where}) -> "
          f"{Path(args.model_store) / entry['archive']}")
    return entry


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


def copy_into_folder(items, source_root, folder):
    """Copies each new item's photo to <folder>/<category>/<file>; identical files already there are kept."""
    check_copies(items, source_root, folder)
    for it in items:
        (folder / it.image).parent.mkdir(parents=True, exist_ok=True)
        if not (folder / it.image).exists():
            shutil.copy2(source_root / it.image, folder / it.image)


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


def check_change(catalogue, source_dir, remove, new_items):
    """Refuses unknown ids to remove, new ids already in the catalogue (unless removed in the same run), and an
    update that would leave no item; a lookup of the changed ids only."""
    found = catalogue.items.keys_of(remove)
    unknown = [i for i in remove if i not in found]
    if unknown:
        raise ValueError(f"not in the catalogue of {source_dir}: {named(unknown)}")
    clashes = set(catalogue.items.keys_of([it.id for it in new_items])) - set(remove)
    if clashes:
        raise ValueError(f"ids already in the catalogue: {named(clashes)} (remove them first to replace)")
    if catalogue.count - len(remove) + len(new_items) <= 0:
        raise ValueError("removing every item would leave an empty catalogue")


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


def embed_to_file(args, path, model, root, items, categories, preprocess, normalize, out_dir):
    """Checks that every photo decodes (listing the ones that do not), then streams the embeddings to `path`."""
    ctx = Context(device=pick_device(args.device))
    check_photos(ctx, root, items, out_dir, size=preprocess.image_size, workers=args.embed_workers)
    return embed_catalogue_to_file(ctx, path, model, root, items, categories, preprocess, normalize,
                                   args.embed_batch_size, args.embed_workers)


def updated_in_place(args, source, out_dir, folder, new_catalogue, remove, new_items, notes):
    """--add / --remove: the source catalogue updated into `new_catalogue`, only the new photos embedded."""
    vectors = None
    if new_items:
        vectors = embed_to_file(args, out_dir / ADDED_EMBEDDINGS_FILE, source.model, args.add, new_items,
                                source.categories, source.preprocess, source.normalize, out_dir)
        copy_into_folder(new_items, Path(args.add), folder)
        if args.image_prefix:
            new_items = [replace(it, image=args.image_prefix + it.image) for it in new_items]
    update_catalogue(source.catalogue.folder, new_catalogue, add_items=new_items, add_embeddings=vectors,
                     remove_ids=remove, notes=notes)
    return write_bundle(out_dir, model=source.model.cpu(), categories=source.categories,
                        preprocess=source.preprocess, catalogue_dir=new_catalogue, normalize=source.normalize,
                        runtime=source.manifest.get("runtime"), notes=notes, image_root=folder)


def recalibrated(args, source, model, preprocess, embeddings, items, folder):
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
                           record.get("seed", 0), image_root=folder)


def re_embedded(args, source, out_dir, folder, new_catalogue, remove, new_items, notes):
    """--checkpoint: every item (less the removed, plus the new) embedded with the retrained weights from the
    catalogue image folder, published as a fresh catalogue with the source's index profile."""
    model, categories, preprocess = model_from_checkpoint(load_checkpoint(args.checkpoint))
    if new_items:
        copy_into_folder(new_items, Path(args.add), folder)
        if args.image_prefix:
            new_items = [replace(it, image=args.image_prefix + it.image) for it in new_items]
    removed = set(remove)
    items = [it for it in source.catalogue.all_items() if it.id not in removed] + new_items
    path = embed_to_file(args, out_dir / EMBEDDINGS_FILE, model, folder, [local_image(it) for it in items],
                         categories, preprocess, source.normalize, out_dir)
    bundled = source.manifest["catalogue"].get("bundled")
    duplicates = recalibrated(args, source, model, preprocess, path, [local_image(it) for it in items], folder)
    return publish_bundle(out_dir, model=model.cpu(), categories=categories, preprocess=preprocess, items=items,
                          embeddings=path, normalize=source.normalize,
                          catalogue_dir=None if bundled else new_catalogue, **index_plan(source.catalogue.manifest),
                          runtime=source.manifest.get("runtime"), notes=notes, image_root=folder,
                          duplicates=duplicates)


def update(args):
    record = read_record(args)
    latest = record["versions"][-1] if record["versions"] else None
    if not args.bundle and not latest:
        raise ValueError(f"no versions recorded in {record_path(args)}: pass --bundle, the current bundle")
    source_dir = Path(args.bundle or latest["bundle"])
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
    check_change(source.catalogue, source_dir, remove, new_items)  # before anything is written
    if args.add:
        folder = need_folder(folder, "--add")
        check_copies(new_items, Path(args.add), folder)
    if args.checkpoint:
        folder = need_folder(folder, "--checkpoint")
    first = latest is None
    if first:  # the source becomes version 1, so that there is something to roll back to
        latest = pack(args, record, source_dir, source.manifest, f"initial catalogue from {source_dir}",
                      archive_options, folder)
    if not (args.add or remove or args.checkpoint):
        if first:
            return latest
        raise ValueError("nothing to change: pass --add, --remove or --checkpoint")

    number = next_number(record)
    out_dir = Path(args.out_dir) if args.out_dir else source_dir.parent / f"{args.name}-v{number}"
    new_catalogue = new_catalogue_folder(source, out_dir, args.name, number)
    refuse_existing(out_dir, new_catalogue)

    changes = [f"retrained weights from {args.checkpoint}"] if args.checkpoint else []
    if remove:
        changes.append(f"removed {len(remove)} item(s): {named(remove)}")
    if new_items:
        changes.append(f"added {len(new_items)} item(s) from {args.add}, copied into {folder}")
    if args.note:
        changes.append(args.note)
    notes = f"version {number}.0 from {latest['version']}: {'; '.join(changes)}"
    make = re_embedded if args.checkpoint else updated_in_place
    manifest = make(args, source, out_dir, folder, new_catalogue, remove, new_items, notes)
    return pack(args, record, out_dir, manifest, "; ".join(changes), archive_options, folder)


def main(argv=None):
    args = get_args(argv)
    try:
        return update(args)
    except (BundleError, ValueError, FileNotFoundError, FileExistsError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
