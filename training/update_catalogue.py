"""Catalogue updates without retraining, each packed as the next version of the same model.

    python -m training.update_catalogue --name visual-search --bundle runs/demo/bundle \
        --data-dir data/fashion-mnist/images                                               # record it as v1
    python -m training.update_catalogue --name visual-search --add data/new_photos         # old + new items
    python -m training.update_catalogue --name visual-search --remove sku-17 sku-18
    python -m training.update_catalogue --name visual-search --checkpoint runs/new/best.pt

One rule for image references: every item's reference is relative to ONE catalogue image folder (--data-dir:
the folder the catalogue was indexed from), e.g. "coat/fmnist-train-09615.png", or a URL made with --image-prefix.
--data-dir is recorded with each version, so later runs need it only to change it; a bundle that recorded its
image folder (manifest "image_root") supplies it too.

The source is the bundle of the latest recorded version (or --bundle). --add embeds the photos of a folder laid
out like the catalogue (<category>/<image>) with the source's weights and copies them into the catalogue image
folder, as <category>/<file> (it never overwrites a different file); the old items keep their vectors from
embeddings.npy beside the source bundle. --remove takes items out by id. --checkpoint re-embeds every item with
retrained weights, reading the images from the catalogue image folder. The new bundle is packed as
<model store>/<name>-v<N>.mar with version N.0, and recorded in <model store>/<name>.versions.json: the change, item
count, checksums, image folder, build time. Options this tool does not know go to serving.build_archive (e.g.
--max-batch-delay 20), and are kept for the next versions. Register the archive with
`python -m serving.manage register <name>-v<N>.mar`.
"""
import argparse
import filecmp
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np

from serving.build_archive import main as build_archive
from serving.management import write_json
from serving.torchserve import ROOT
from training.build_index import EMBEDDINGS_FILE, embed_catalogue, write_indexed_bundle
from visual_search.bundle import BundleError, load_bundle
from visual_search.catalogue import scan_folder
from visual_search.checkpoint import load_checkpoint, model_from_checkpoint


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--name", default="visual-search", help="model name (unchanged across versions)")
    p.add_argument("--model-store", default=str(ROOT / "model_store"))
    p.add_argument("--bundle", default=None, help="source bundle (default: the latest recorded version's)")
    p.add_argument("--add", default=None, help="folder of new photos, <category>/<image file>")
    p.add_argument("--image-prefix", default=None, help="put before each new item's <category>/<file> to make "
                                                        "its image reference a URL, e.g. "
                                                        "https://cdn.example.com/products/ (default: none, the "
                                                        "reference is relative to the catalogue image folder)")
    p.add_argument("--remove", nargs="+", default=[], metavar="ID", help="ids of items to take out")
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


def pack(args, record, bundle_dir, manifest, change, archive_options, data_dir):
    """Packs `bundle_dir` as the next version and appends it to the record; returns the record entry."""
    number = next_number(record)
    version, archive = f"{number}.0", f"{args.name}-v{number}"
    build_archive(["--bundle", str(bundle_dir), "--name", args.name, "--version", version, "--out-name", archive,
                   "--model-store", args.model_store, *archive_options])
    entry = {
        "version": version, "archive": f"{archive}.mar", "change": change, "items": manifest["num_items"],
        "weights_sha256": manifest["weights_sha256"], "index_sha256": manifest["index_sha256"],
        "catalogue_sha256": manifest.get("catalogue_sha256"),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "bundle": str(Path(bundle_dir).resolve()),
        "data_dir": str(Path(data_dir).resolve()) if data_dir else None, "archive_options": list(archive_options),
    }
    record["versions"].append(entry)
    write_json(record_path(args), record)
    print(f"version {version}: {change} ({entry['items']} items) -> {Path(args.model_store) / entry['archive']}")
    return entry


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


def old_embeddings(args, source_dir, source, model, categories, preprocess, folder):
    """The vectors of the source's items: embeddings.npy when it fits, else re-embedded from the image folder."""
    path = Path(source_dir) / EMBEDDINGS_FILE
    if not args.checkpoint and path.is_file():
        vectors = np.load(path, allow_pickle=False)
        if vectors.shape == (len(source.items), source.index.d):
            return vectors
    folder = need_folder(folder, "--checkpoint" if args.checkpoint else f"{path} is missing or stale, so re-embedding")
    return embed_catalogue(model, folder, [local_image(it) for it in source.items], categories, preprocess,
                           source.normalize, args.device, args.embed_batch_size, args.embed_workers)


def copy_into_folder(items, source_root, folder):
    """Copies each new item's photo to <folder>/<category>/<file>; refuses before copying anything if that would
    replace a different file. Identical files already there are left as they are."""
    clashes = [folder / it.image for it in items
               if (folder / it.image).exists() and not filecmp.cmp(source_root / it.image, folder / it.image, False)]
    if clashes:
        raise ValueError(f"a different file is already in the catalogue image folder: {', '.join(map(str, clashes))}"
                         " (rename the new photo: its file name is its id)")
    for it in items:
        (folder / it.image).parent.mkdir(parents=True, exist_ok=True)
        if not (folder / it.image).exists():
            shutil.copy2(source_root / it.image, folder / it.image)


def update(args):
    record = read_record(args)
    latest = record["versions"][-1] if record["versions"] else None
    source_dir = Path(args.bundle or (latest and latest["bundle"]) or "")
    if not args.bundle and not latest:
        raise ValueError(f"no versions recorded in {record_path(args)}: pass --bundle, the current bundle")
    source = load_bundle(source_dir)
    folder = image_folder(args, latest, source)
    archive_options = args.archive_options or (latest["archive_options"] if latest else [])
    first = latest is None
    if first:  # the source becomes version 1, so that there is something to roll back to
        latest = pack(args, record, source_dir, source.manifest, f"initial catalogue from {source_dir}",
                      archive_options, folder)
    if not (args.add or args.remove or args.checkpoint):
        if first:
            return latest
        raise ValueError("nothing to change: pass --add, --remove or --checkpoint")

    model, categories, preprocess = source.model, source.categories, source.preprocess
    if args.checkpoint:
        model, categories, preprocess = model_from_checkpoint(load_checkpoint(args.checkpoint))
    items = list(source.items)
    vectors = old_embeddings(args, source_dir, source, model, categories, preprocess, folder)
    changes = [f"retrained weights from {args.checkpoint}"] if args.checkpoint else []

    if args.remove:
        unknown = sorted(set(args.remove) - {it.id for it in items})
        if unknown:
            raise ValueError(f"not in the catalogue of {source_dir}: {', '.join(unknown)}")
        keep = [i for i, it in enumerate(items) if it.id not in set(args.remove)]
        if not keep:
            raise ValueError("removing every item would leave an empty catalogue")
        items, vectors = [items[i] for i in keep], vectors[keep]
        changes.append(f"removed {len(args.remove)} item(s): {', '.join(sorted(args.remove))}")
    if args.add:
        folder = need_folder(folder, "--add")
        new_items = scan_folder(args.add)
        clashes = sorted({it.id for it in new_items} & {it.id for it in items})
        if clashes:
            raise ValueError(f"ids already in the catalogue: {', '.join(clashes)} (remove them first to replace)")
        new_vectors = embed_catalogue(model, args.add, new_items, categories, preprocess, source.normalize,
                                      args.device, args.embed_batch_size, args.embed_workers)
        copy_into_folder(new_items, Path(args.add), folder)
        if args.image_prefix:
            new_items = [replace(it, image=args.image_prefix + it.image) for it in new_items]
        items, vectors = items + new_items, np.concatenate([vectors, new_vectors])
        changes.append(f"added {len(new_items)} item(s) from {args.add}, copied into {folder}")
    if args.note:
        changes.append(args.note)

    number = next_number(record)
    out_dir = Path(args.out_dir) if args.out_dir else source_dir.parent / f"{args.name}-v{number}"
    manifest = write_indexed_bundle(out_dir, model=model, categories=categories, preprocess=preprocess, items=items,
                                    embeddings=vectors, factory=source.manifest["index_factory"],
                                    normalize=source.normalize, runtime=source.manifest.get("runtime"),
                                    notes=f"version {number}.0 from {latest['version']}: {'; '.join(changes)}")
    return pack(args, record, out_dir, manifest, "; ".join(changes), archive_options, folder)


def main(argv=None):
    args = get_args(argv)
    try:
        return update(args)
    except (BundleError, ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
