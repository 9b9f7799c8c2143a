"""Embed the catalogue with a trained checkpoint and write the bundle: weights, the OpenVINO IR of its runtime (the
fastest that passes the parity gate, by default), manifest and the catalogue folder (bundled, or outside with
--catalogue-dir). The catalogue is the run's training split unless --catalogue or --all; photos are checked before
embedding; under torchrun each rank embeds its share. See docs/training.md."""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from training import distributed
from training.calibration import DEFAULT_LISTINGS, TARGET_PRECISION, calibrate_model
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.embedding import iter_embeddings
from training.optimize import calibration_items
from training.parity_gate import (
    GATE_ITEMS,
    GATE_QUERIES,
    MAX_DROP,
    REFERENCE,
    RUNTIME_NAMES,
    GateSample,
    Runtimes,
    candidates,
    choose,
)
from training.photo_check import BadPhotosError, check_photos
from training.publish import publish_bundle, weights_sha256
from visual_search import EMBEDDING_DIM
from visual_search.bundle import CATALOGUE_DIR, MANIFEST_FILE, MODEL_FILE, catalogue_folder
from visual_search.catalogue import read_manifest
from visual_search.catalogue.index import PROFILES
from visual_search.cli import HelpFormatter
from visual_search.fileio import write_atomically
from visual_search.items import read_csv, scan_folder
from visual_search.model import TrainedModel
from visual_search.openvino_engine import IR_BIN, IR_XML
from visual_search.runtime import Runtime

USAGE = """examples:
  python -m training.build_index --checkpoint runs/x/best.pt --data-dir data/photos --out-dir runs/x/bundle
  python -m training.build_index ... --profile compact --catalogue-dir /srv/catalogues/shop-v1
  python -m training.build_index ... --runtime openvino-bf16 --queries runs/x/val.csv
  torchrun --nproc-per-node 4 -m training.build_index ...
"""

OUTSIDE_MARKER = ".outside-catalogue"  # names the outside catalogue folder of a bundle not finished yet
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
    duplicates = p.add_mutually_exclusive_group()
    duplicates.add_argument("--duplicates-photos", default=None,
                            help="CSV of held-out photos under --data-dir to calibrate the near-duplicate thresholds "
                                 "on (default: val.csv beside the checkpoint, when it is there)")
    duplicates.add_argument("--no-duplicates-calibration", action="store_true",
                            help="publish without near-duplicate thresholds (requests must then give one)")
    p.add_argument("--duplicates-listings", type=int, default=DEFAULT_LISTINGS,
                   help="held-out photos the near-duplicate calibration uses, spread over the categories (0: all)")
    p.add_argument("--target-precision", type=float, default=TARGET_PRECISION,
                   help="the near-duplicate threshold is the largest with at least this precision")
    p.add_argument("--skip-bad", action="store_true", help="leave out photos that cannot be decoded (listed in "
                                                           "<out-dir>/bad-photos.csv) instead of stopping")
    gate = p.add_argument_group("runtime", "the runtime that embeds the catalogue and will serve its queries, and "
                                           "the parity gate that admits it (docs/performance.md)")
    gate.add_argument("--runtime", choices=RUNTIME_NAMES, default="auto",
                      help="auto: on a CPU, the fastest OpenVINO precision that passes the gate (int8, then bf16, "
                           "then fp32); on CUDA or under torchrun, torch-fp32")
    gate.add_argument("--queries", default=None, help="CSV of held-out photos for the gate (default: val.csv beside "
                                                      "the checkpoint, else a catalogue sample left out)")
    gate.add_argument("--calibration", default=None, help="CSV of the int8 calibration photos (default: 300 "
                                                          "catalogue photos, seeded)")
    gate.add_argument("--gate-items", type=int, default=GATE_ITEMS, help="catalogue photos the gate embeds")
    gate.add_argument("--gate-queries", type=int, default=GATE_QUERIES, help="held-out photos the gate embeds")
    gate.add_argument("--accept-quality-drop", action="store_true",
                      help=f"build a runtime asked for by name even if its precision@4 drops more than {MAX_DROP}")
    return p.parse_args(argv)


def catalogue_items(args):
    if args.all:
        return scan_folder(args.data_dir)
    path = Path(args.catalogue) if args.catalogue else Path(args.checkpoint).parent / "train.csv"
    if not path.is_file():
        raise FileNotFoundError(f"catalogue list {path} not found: pass --catalogue or --all")
    return read_csv(path)


def duplicates_photos(args):
    """The held-out photos list to calibrate the near-duplicate thresholds on, or None (none asked for, or no
    val.csv beside the checkpoint)."""
    if args.no_duplicates_calibration:
        return None
    if args.duplicates_photos:
        if not Path(args.duplicates_photos).is_file():
            raise FileNotFoundError(f"--duplicates-photos {args.duplicates_photos} not found")
        return Path(args.duplicates_photos)
    default = Path(args.checkpoint).parent / "val.csv"
    return default if default.is_file() else None


def embed_catalogue_to_file(ctx, path, model, data_dir, items, categories, preprocess, normalize, batch_size=64,
                            workers=0, settings=None, ir=None):
    """Streams the embeddings of `items` into the .npy at `path`, each rank the rows of its contiguous share, through
    the runtime that will embed the queries (`settings`, default torch fp32; `ir`: its optimize.Ir), on this rank's
    device (the CPU for OpenVINO).

    Rank 0 creates the file under a temporary name and renames it once every rank has written its rows, so a
    build that stops half-way never leaves an embeddings.npy with rows missing.
    """
    source = TrainedModel(model, preprocess, normalize, ir=ir and ir.model, ir_precision=ir and ir.precision)
    openvino = settings is not None and settings.engine == "openvino"
    runtime = Runtime(source, "cpu" if openvino else ctx.device, settings)
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


def clear_unfinished(out_dir):
    """Removes what a bundle folder holds before its manifest.json, the last file a build writes: the pieces of a
    build that failed or was killed. A finished bundle (with its manifest) is never touched."""
    if (out_dir / MANIFEST_FILE).exists() or not out_dir.is_dir():
        return
    marker = out_dir / OUTSIDE_MARKER
    if marker.is_file():  # the outside catalogue folder this unfinished build published
        shutil.rmtree(marker.read_text().strip(), ignore_errors=True)
    for name in (CATALOGUE_DIR, MODEL_FILE, IR_XML, IR_BIN, EMBEDDINGS_FILE, f"{EMBEDDINGS_FILE}.partial",
                 OUTSIDE_MARKER):
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def held_out(args):
    """The gate's held-out photos: --queries, else val.csv beside the checkpoint, else none."""
    path = Path(args.queries) if args.queries else Path(args.checkpoint).parent / "val.csv"
    if args.queries and not path.is_file():
        raise FileNotFoundError(f"held-out photos {path} not found")
    return read_csv(path) if path.is_file() else []


def choose_runtime(args, ctx, model, categories, preprocess, normalize, items):
    """The parity gate's Choice of runtime (its IR made here, once); torch fp32 asked for needs no gate."""
    distributed = ctx.world_size > 1
    if distributed and args.runtime not in ("auto", "torch-fp32"):
        raise ValueError(f"--runtime {args.runtime} is built in one process: run build_index without torchrun")
    names = candidates(args.runtime, ctx.device, distributed)
    sample, held = None, set()
    if names != [REFERENCE]:
        sample = GateSample.draw(args.data_dir, items, held_out(args), categories, args.gate_items,
                                 args.gate_queries)
        held = {it.id for it in sample.queries}
    calibration = read_csv(args.calibration) if args.calibration else calibration_items(
        [it for it in items if it.id not in held])
    runtimes = Runtimes(model, preprocess, normalize, args.data_dir, items, categories, ctx.device, calibration)
    choice = choose(args.runtime, names, runtimes, sample, args.accept_quality_drop, args.batch_size, args.workers)
    if choice.ir is not None and choice.ir.calibration is not None:
        choice.ir.calibration["from"] = str(args.calibration) if args.calibration else "catalogue"
    print(f"runtime {choice.settings.name} ({args.runtime} asked for)", flush=True)
    return choice


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
    if (out_dir / MANIFEST_FILE).exists():
        raise FileExistsError(f"{out_dir} already holds a bundle: a bundle is written once; choose another --out-dir")
    if ctx.is_main:
        clear_unfinished(out_dir)  # what a run killed before its manifest left
    if args.catalogue_dir and Path(args.catalogue_dir).exists():
        raise FileExistsError(f"{args.catalogue_dir} exists: a catalogue folder is written once; choose a new name")
    distributed.barrier(ctx)
    try:
        choice = choose_runtime(args, ctx, model, categories, preprocess, normalize, items)
        embed_catalogue_to_file(ctx, out_dir / EMBEDDINGS_FILE, model, args.data_dir, items, categories, preprocess,
                                normalize, args.batch_size, args.workers, choice.settings, choice.ir)
        manifest = None
        if ctx.is_main:
            if args.catalogue_dir:
                write_atomically(out_dir / OUTSIDE_MARKER, str(Path(args.catalogue_dir).resolve()))
            photos, duplicates = duplicates_photos(args), None
            if photos is not None:  # the near-duplicate thresholds, measured with the runtime that serves queries
                duplicates = calibrate_model(model, preprocess, normalize, ctx.device, photos, args.data_dir,
                                             out_dir / EMBEDDINGS_FILE, items, weights_sha256(model.cpu()),
                                             args.duplicates_listings, args.target_precision,
                                             settings=choice.settings, ir=choice.ir)
            manifest = publish_bundle(out_dir, model=model.cpu(), categories=categories, preprocess=preprocess,
                                      items=items, embeddings=out_dir / EMBEDDINGS_FILE, normalize=normalize,
                                      catalogue_dir=args.catalogue_dir, profile=args.profile, factory=args.factory,
                                      search=args.search, notes=f"built from {args.checkpoint}",
                                      image_root=args.data_dir, runtime=choice.settings.to_dict(),
                                      catalogue_runtime=choice.catalogue_runtime, ir=choice.ir, parity=choice.parity,
                                      duplicates=duplicates)
    except BaseException:
        if ctx.is_main:
            clear_unfinished(out_dir)
        raise
    if ctx.is_main:
        (out_dir / OUTSIDE_MARKER).unlink(missing_ok=True)
        where = "bundled" if manifest["catalogue"]["bundled"] else f"outside, in {manifest['catalogue']['path']}"
        catalogue = read_manifest(catalogue_folder(out_dir, manifest))
        print(f"indexed {catalogue['count']} items ({catalogue['profile']}: {catalogue['factory']}, "
              f"{'unit-length' if normalize else 'raw'} embeddings, runtime {choice.settings.name}) in {out_dir}; "
              f"catalogue {where}")
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
