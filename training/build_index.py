"""Embed the catalogue with a trained checkpoint and write the bundle: weights, manifest and the catalogue folder
(bundled, or outside with --catalogue-dir). The catalogue is the run's training split unless --catalogue or --all;
photos are checked before embedding; under torchrun each rank embeds its share. See docs/training.md."""
import argparse
import json
from pathlib import Path

import numpy as np

from training import distributed
from training.calibration import DEFAULT_LISTINGS, TARGET_PRECISION, calibrate_model
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.embedding import iter_embeddings
from training.photo_check import BadPhotosError, check_photos
from training.publish import publish_bundle, weights_sha256
from visual_search import EMBEDDING_DIM
from visual_search.bundle import catalogue_folder
from visual_search.catalogue import read_manifest
from visual_search.catalogue.index import PROFILES
from visual_search.cli import HelpFormatter
from visual_search.items import read_csv, scan_folder
from visual_search.model import TrainedModel
from visual_search.runtime import Runtime

USAGE = """examples:
  python -m training.build_index --checkpoint runs/x/best.pt --data-dir data/photos --out-dir runs/x/bundle
  python -m training.build_index ... --profile compact --catalogue-dir /srv/catalogues/shop-v1
  torchrun --nproc-per-node 4 -m training.build_index ...
"""

EMBEDDINGS_FILE = "embeddings.npy"  # beside the bundle, the publishing step's input; not shipped in the archive


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", required=True, help="root that catalogue image references are relative to")
    p.add_argument("--out-dir", required=True, help="bundle folder (under torchrun on storage every node shares)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--catalogue", help="CSV of id,category,image (default: train.csv beside the checkpoint)")
    source.add_argument("--all", action="store_true", help="index every image under --data-dir")
    plan = p.add_mutually_exclusive_group()
    plan.add_argument("--profile", choices=list(PROFILES), default=None,
                      help="index profile (default: by catalogue size: exact up to 50k items, accurate up to 10M, "
                           "compact above)")
    plan.add_argument("--factory", default=None, help='any FAISS index_factory string instead, e.g. "HNSW32", '
                                                      '"IVF256,SQ8"')
    p.add_argument("--search", type=json.loads, default=None, help='search parameters as JSON, overriding the '
                                                                   'profile\'s, e.g. \'{"nprobe": 32}\'')
    p.add_argument("--catalogue-dir", default=None, help="publish the catalogue folder here, outside the bundle "
                                                         "(written once; default: <out-dir>/catalogue, bundled)")
    p.add_argument("--no-normalize", action="store_true", help="index raw embeddings instead of unit-length ones")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N; under torchrun auto, cpu or cuda")
    calibration = p.add_mutually_exclusive_group()
    calibration.add_argument("--calibration-photos", default=None,
                             help="CSV of held-out photos under --data-dir to calibrate the near-duplicate threshold "
                                  "on (default: val.csv beside the checkpoint, when it is there)")
    calibration.add_argument("--no-calibration", action="store_true",
                             help="publish without a near-duplicate threshold (requests must then give one)")
    p.add_argument("--calibration-listings", type=int, default=DEFAULT_LISTINGS,
                   help="held-out photos used, spread over the categories (0: all)")
    p.add_argument("--target-precision", type=float, default=TARGET_PRECISION,
                   help="the near-duplicate threshold is the largest with at least this precision")
    p.add_argument("--skip-bad", action="store_true", help="leave out photos that cannot be decoded (listed in "
                                                           "<out-dir>/bad-photos.csv) instead of stopping")
    return p.parse_args(argv)


def catalogue_items(args):
    if args.all:
        return scan_folder(args.data_dir)
    path = Path(args.catalogue) if args.catalogue else Path(args.checkpoint).parent / "train.csv"
    if not path.is_file():
        raise FileNotFoundError(f"catalogue list {path} not found: pass --catalogue or --all")
    return read_csv(path)


def calibration_photos(args):
    """The held-out photos list to calibrate on, or None (none asked for, or no val.csv beside the checkpoint)."""
    if args.no_calibration:
        return None
    if args.calibration_photos:
        if not Path(args.calibration_photos).is_file():
            raise FileNotFoundError(f"--calibration-photos {args.calibration_photos} not found")
        return Path(args.calibration_photos)
    default = Path(args.checkpoint).parent / "val.csv"
    return default if default.is_file() else None


def embed_catalogue_to_file(ctx, path, model, data_dir, items, categories, preprocess, normalize, batch_size=64,
                            workers=0):
    # the runtime that will embed the queries, on this rank's device
    runtime = Runtime(TrainedModel(model, preprocess, normalize), ctx.device)
    """Streams the embeddings of `items` into the .npy at `path`, each rank the rows of its contiguous share.

    Rank 0 creates the file under a temporary name and renames it once every rank has written its rows, so a
    build that stops half-way never leaves an embeddings.npy with rows missing.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if ctx.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(len(items), EMBEDDING_DIM)).flush()
    distributed.barrier(ctx)
    if not partial.is_file():
        raise FileNotFoundError(f"{partial}, made by rank 0, is not visible here: under torchrun --out-dir must be "
                                f"on storage that every node shares")
    rows = np.lib.format.open_memmap(partial, mode="r+")
    start, end = distributed.shard_range(len(items), ctx.rank, ctx.world_size)
    row = start
    for embeddings, _ in iter_embeddings(runtime, data_dir, items[start:end], categories, batch_size, workers,
                                         desc="embedding catalogue", progress=ctx.is_main):
        rows[row:row + len(embeddings)] = embeddings
        row += len(embeddings)
    rows.flush()
    del rows
    distributed.barrier(ctx)
    if ctx.is_main:
        partial.replace(path)
    return path


def build(args, ctx):
    out_dir = Path(args.out_dir)
    model, categories, preprocess = model_from_checkpoint(load_checkpoint(args.checkpoint))
    items = catalogue_items(args)
    if not items:
        raise ValueError("the catalogue is empty")
    distributed.check_same_on_all_ranks(ctx, "\n".join(f"{it.id},{it.category},{it.image}" for it in items),
                                        "the catalogue list")
    items = check_photos(ctx, args.data_dir, items, out_dir, args.skip_bad, preprocess.image_size, args.workers)
    if not items:
        raise ValueError(f"no readable photos left in the catalogue under {args.data_dir}")
    normalize = not args.no_normalize
    embed_catalogue_to_file(ctx, out_dir / EMBEDDINGS_FILE, model, args.data_dir, items, categories, preprocess,
                            normalize, args.batch_size, args.workers)
    manifest = None
    if ctx.is_main:
        photos, duplicates = calibration_photos(args), None
        if photos is not None:
            duplicates = calibrate_model(model, preprocess, normalize, ctx.device, photos, args.data_dir,
                                         out_dir / EMBEDDINGS_FILE, items, weights_sha256(model.cpu()),
                                         args.calibration_listings, args.target_precision)
        manifest = publish_bundle(out_dir, model=model.cpu(), categories=categories, preprocess=preprocess,
                                  items=items, embeddings=out_dir / EMBEDDINGS_FILE, normalize=normalize,
                                  catalogue_dir=args.catalogue_dir, profile=args.profile, factory=args.factory,
                                  search=args.search, notes=f"built from {args.checkpoint}", image_root=args.data_dir,
                                  duplicates=duplicates)
        where = "bundled" if manifest["catalogue"]["bundled"] else f"outside, in {manifest['catalogue']['path']}"
        catalogue = read_manifest(catalogue_folder(out_dir, manifest))
        print(f"indexed {catalogue['count']} items ({catalogue['profile']}: {catalogue['factory']}, "
              f"{'unit-length' if normalize else 'raw'} embeddings) in {out_dir}; catalogue {where}")
    return manifest  # the other ranks are done: they need not wait while rank 0 builds the index


def main(argv=None):
    args = get_args(argv)
    with distributed.session(args.device) as ctx:
        return build(args, ctx)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        distributed.exit_with_error(error, same_on_every_rank=isinstance(error, BadPhotosError))
