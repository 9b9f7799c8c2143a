"""Catalogue folders from the command line: publish, update, re-index, verify (full sha256), inspect, search by
listing. Embeddings are float32 .npy [N, 2048] with rows in the items CSV's order (id,category,image)."""
import argparse
import json
import sys

import faiss

from ..cli import HelpFormatter
from ..errors import VisualSearchError
from ..items import read_csv
from ..runtime_settings import RUNTIME_NAMES, RuntimeSettings
from .build import publish_catalogue, reindex_catalogue, update_catalogue
from .index import PROFILES
from .manifest import read_manifest
from .store import open_catalogue, verify_catalogue

USAGE = """examples:
  python -m visual_search.catalogue publish catalogues/shop-v1 --embeddings emb.npy --items items.csv \
      --categories-from runs/x/bundle/manifest.json [--profile accurate | --factory "IVF4096,SQ8"]
  python -m visual_search.catalogue update catalogues/shop-v1 catalogues/shop-v2 --add-items new.csv \
      --add-embeddings new.npy --remove sku-17
  python -m visual_search.catalogue reindex catalogues/shop-v2 catalogues/shop-v2-compact --profile compact
  python -m visual_search.catalogue verify catalogues/shop-v2
  python -m visual_search.catalogue info catalogues/shop-v2
  python -m visual_search.catalogue search catalogues/shop-v2 --listing sku-7 -k 4 --category coat
"""

def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m visual_search.catalogue", description=__doc__, epilog=USAGE,
                                formatter_class=HelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="FAISS threads (default: all cores)")
    sub = p.add_subparsers(dest="command", required=True)

    def plan_options(command):
        group = command.add_mutually_exclusive_group()
        group.add_argument("--profile", choices=list(PROFILES), help="default: chosen by catalogue size")
        group.add_argument("--factory", help="any FAISS index_factory string instead of a profile")
        command.add_argument("--search", type=json.loads, default=None,
                             help='search parameters as JSON, e.g. \'{"nprobe": 32}\'')

    publish = sub.add_parser("publish", help="a new catalogue folder from embeddings and items")
    publish.add_argument("out")
    publish.add_argument("--embeddings", required=True, help=".npy, float32 [N, 2048]")
    publish.add_argument("--items", required=True, help="CSV id,category,image in the embeddings' row order")
    cats = publish.add_mutually_exclusive_group()
    cats.add_argument("--categories", nargs="+", help="category names in code order")
    cats.add_argument("--categories-from", help="a bundle manifest.json: its categories, in the model's order")
    publish.add_argument("--no-normalize", action="store_true", help="keep the vectors' lengths")
    publish.add_argument("--notes", default="")
    publish.add_argument("--runtime", choices=RUNTIME_NAMES, default="torch-fp32",
                         help="the runtime that embedded the rows (served queries must match it)")
    plan_options(publish)

    update = sub.add_parser("update", help="the next version: items added and removed, nothing retrained")
    update.add_argument("source")
    update.add_argument("out")
    update.add_argument("--add-items", help="CSV of the new items")
    update.add_argument("--add-embeddings", help=".npy of the new items' embeddings")
    update.add_argument("--remove", nargs="+", default=[], metavar="ID")
    update.add_argument("--remove-file", help="a file of ids to remove, one a line")
    update.add_argument("--notes", default="")
    update.add_argument("--runtime", choices=RUNTIME_NAMES, default="torch-fp32",
                        help="the runtime that embedded the new rows: the catalogue's own")

    reindex = sub.add_parser("reindex", help="the same items with another index profile")
    reindex.add_argument("source")
    reindex.add_argument("out")
    plan_options(reindex)

    verify = sub.add_parser("verify", help="full sha256 of every file, then a full open")
    verify.add_argument("folder")
    info = sub.add_parser("info", help="the manifest, without the file list")
    info.add_argument("folder")
    search = sub.add_parser("search", help="neighbours of a listing")
    search.add_argument("folder")
    search.add_argument("--listing", required=True)
    search.add_argument("-k", type=int, default=4)
    search.add_argument("--category", nargs="+", default=[])
    search.add_argument("--exclude", nargs="+", default=[])
    return p.parse_args(argv)


def run(args):
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    if args.command == "publish":
        categories = args.categories
        if args.categories_from:
            with open(args.categories_from) as f:
                categories = json.load(f)["categories"]
        manifest = publish_catalogue(args.out, args.embeddings, read_csv(args.items), categories=categories,
                                     profile=args.profile, factory=args.factory, search=args.search,
                                     normalize=not args.no_normalize, notes=args.notes,
                                     runtime=RuntimeSettings.named(args.runtime).record())
    elif args.command == "update":
        remove = list(args.remove)
        if args.remove_file:
            with open(args.remove_file) as f:
                remove += [line.strip() for line in f if line.strip()]
        items = read_csv(args.add_items) if args.add_items else []
        manifest = update_catalogue(args.source, args.out, add_items=items, add_embeddings=args.add_embeddings,
                                    remove_ids=remove, notes=args.notes,
                                    runtime=RuntimeSettings.named(args.runtime).record())
    elif args.command == "reindex":
        manifest = reindex_catalogue(args.source, args.out, profile=args.profile, factory=args.factory,
                                     search=args.search)
    elif args.command == "verify":
        manifest = verify_catalogue(args.folder)
        print(f"ok: {args.folder}: {len(manifest['files'])} files match their sha256; {manifest['count']} items")
        return
    elif args.command == "info":
        manifest = read_manifest(args.folder)
        print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=2))
        return
    else:
        catalogue = open_catalogue(args.folder)
        try:
            hits = catalogue.search_by_listing(args.listing, args.k, args.category, args.exclude)
        finally:
            catalogue.close()
        print(f"{hits.listing.id} ({hits.listing.category}) -> {len(hits.neighbours)} of {hits.available}:")
        for n in hits.neighbours:
            print(f"  {n.id:24s} {n.category:16s} {n.distance:.4f}  {n.image}")
        return
    print(f"{args.out}: {manifest['change']}; {manifest['count']} items, {manifest['factory']} "
          f"{manifest['search']}")


def main(argv=None):
    args = get_args(argv)
    try:
        run(args)
    except (VisualSearchError, ValueError, FileNotFoundError, FileExistsError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
