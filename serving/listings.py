"""Listings in and out of a served catalogue line within seconds, without a new version: an added photo is embedded
by the line's latest bundle through the serving runtime; adds and removals go durably to the line's change log,
which every worker of every version follows. A command line here; serving.listings_api serves the same over HTTP.
`python -m training.next_version --compact` folds the log into the next version."""
import argparse
import io
import json
import sys
import threading
from pathlib import Path

from PIL import Image

from serving.torchserve import MODEL_STORE
from serving.version_record import changes_path, latest_version
from visual_search.bundle import load_bundle, read_manifest
from visual_search.catalogue.changes import ChangeLog, ListingExists
from visual_search.catalogue.live import ChangeFollower
from visual_search.catalogue.milvus import TOKEN_ENV, MilvusSettings
from visual_search.cli import HelpFormatter
from visual_search.errors import InputError, UnknownListingError, VisualSearchError
from visual_search.fileio import write_atomically
from visual_search.items import Item
from visual_search.request import check_plain, read_listing, shown
from visual_search.runtime import Runtime
from visual_search.runtime_settings import catalogue_settings

USAGE = """examples:
  python -m serving.listings add --id sku-1 --category coat --photo coat.jpg
  python -m serving.listings add --id sku-2 --category coat --photo coat2.jpg --image https://cdn.example.com/sku-2.jpg
  python -m serving.listings remove sku-1 sku-7
  python -m serving.listings status
  python -m serving.listings api --port 8083        # the HTTP write API (serving.listings_api)
  python -m serving.listings --milvus-uri http://milvus:19530 --milvus-collection shop add ...   # Milvus engine
"""
MAX_UNFOLDED = 100_000  # adds and removals not yet folded into a version; beyond, compact first
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


class TooManyUnfolded(VisualSearchError):
    status = 507
    label = "unfolded_limit"


def embedding_runtime(bundle, device):
    """The Runtime that embeds added photos: the one that embedded the bundle's catalogue, with its IR."""
    settings = catalogue_settings(bundle.catalogue.manifest)
    return Runtime(bundle, "cpu" if settings.engine == "openvino" else device, settings)


class ListingWriter:
    """Writes one line's changes: the line's latest bundle and runtime embed added photos, its sealed catalogue and
    the log say what is live. Thread-safe (one change at a time)."""

    def __init__(self, bundle_dir, log_path, line, images=None, max_unfolded=MAX_UNFOLDED, device="cpu"):
        self.bundle = load_bundle(bundle_dir)
        self.runtime = embedding_runtime(self.bundle, device)
        self.weights = self.bundle.manifest["weights_sha256"]
        self.log = ChangeLog(log_path, write=True, line=line)
        self.line, self.images, self.max_unfolded = line, Path(images) if images else None, max_unfolded
        self.follower = ChangeFollower(self.bundle.catalogue, self.log.path, self.weights)
        self.lock = threading.Lock()

    def close(self):
        self.follower.close()
        self.log.close()
        self.bundle.catalogue.close()

    def in_sealed(self, item_id):
        return item_id in self.bundle.catalogue.items.keys_of([item_id])

    def embed(self, photo):
        """The photo's vector, as the serving runtime makes it (decode, preprocess, model, normalise)."""
        prepared = self.runtime.prepare([{"body": photo}], [{}])
        if prepared.errors[0] is not None:
            raise prepared.errors[0]
        return self.runtime.embed(prepared.batch)[0][0]

    def add(self, item_id, category, photo, image=None):
        """Adds a live listing; returns {"seq", "id", "category", "image"}. The photo goes to the catalogue image
        folder as <category>/<id><suffix> unless `image` gives its reference (a URL, say)."""
        item_id, category = self.checked(item_id, category, self.bundle.catalogue)
        vector = self.embed(photo)
        with self.lock:
            self.check_room()
            image, seq = self.with_photo(item_id, category, photo, image, lambda image: self.log.append_add(
                Item(item_id, category, str(image)), vector, self.weights, self.in_sealed))
        return {"seq": seq, "id": item_id, "category": category, "image": str(image)}

    @staticmethod
    def checked(item_id, category, catalogue):
        """(id, category) of a listing to add, read as requests are; InputError for a category not in `catalogue`."""
        item_id = read_listing(check_plain("id", item_id), None, True)
        category = check_plain("category", str(category or "").strip())
        if category not in catalogue.category_codes:
            raise InputError(f"unknown category {shown(category)}; this catalogue has: "
                             f"{', '.join(catalogue.categories)}")
        return item_id, category

    def with_photo(self, item_id, category, photo, image, write):
        """(image reference, what `write(image)` returned): the photo stored first unless `image` is given, and
        taken away again if the write fails."""
        written = None
        if image is None:
            image, written = self.store_photo(item_id, category, photo)
        try:
            return image, write(image)
        except BaseException:
            if written is not None:
                written.unlink(missing_ok=True)
            raise

    def remove(self, item_id):
        """Removes a live listing; returns {"seq", "id"}. UnknownListingError (404) when it is not live."""
        item_id = read_listing(check_plain("id", item_id), None, True)
        with self.lock:
            seq = self.log.append_remove(item_id, self.in_sealed)
        return {"seq": seq, "id": item_id}

    def state(self, item_id):
        """{"id", "state": "live" | "removed" | "unknown", "seq"} of a listing."""
        last = self.log.latest(item_id)
        if last is not None:
            return {"id": item_id, "state": "live" if last.op == "add" else "removed", "seq": last.seq}
        return {"id": item_id, "state": "live" if self.in_sealed(item_id) else "unknown", "seq": None}

    def status(self):
        self.follower.refresh()
        return {"line": self.line, "log": str(self.log.path), "last_seq": self.log.last_seq(),
                "folded_by_latest_version": self.follower.folded, "unfolded": self.follower.unfolded,
                "max_unfolded": self.max_unfolded, "live_items": self.bundle.catalogue.live_count}

    def check_room(self):
        unfolded = self.log.unfolded(self.follower.folded)
        if unfolded >= self.max_unfolded:
            raise TooManyUnfolded(f"{unfolded} changes are not folded into a version yet (the limit is "
                                  f"{self.max_unfolded}): run `python -m training.next_version --compact` first")

    def store_photo(self, item_id, category, photo):
        """(reference, path written or None): <category>/<id><suffix> in the catalogue image folder."""
        if self.images is None:
            raise InputError("give the listing's image reference (image), or run the writer with --images, the "
                             "catalogue image folder its photos go to")
        suffix = SUFFIXES.get(Image.open(io.BytesIO(photo)).format, ".img")
        reference = f"{category}/{item_id}{suffix}"
        if "/" in item_id or item_id.startswith("."):
            raise InputError(f"listing id {shown(item_id)} cannot name a file: give its image reference (image)")
        path = self.images / reference
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if path.read_bytes() == photo:
                return reference, None
            raise InputError(f"a different photo is already at {reference}: give the listing another id, or its "
                             f"image reference", status=409)
        write_atomically(path, photo)
        return reference, path


class MilvusListingWriter(ListingWriter):
    """Writes one line's changes into its Milvus collection itself: an add is an upsert of the listing's row, a
    removal a delete by id. Milvus's WAL makes them durable and its consistency level visible; no log of ours."""

    def __init__(self, bundle_dir, milvus, line, images=None, device="cpu"):
        self.bundle = load_bundle(bundle_dir, milvus=milvus)
        self.catalogue = self.bundle.catalogue
        self.runtime = embedding_runtime(self.bundle, device)
        self.line, self.images = line, Path(images) if images else None
        self.lock = threading.Lock()

    def close(self):
        self.catalogue.close()

    def add(self, item_id, category, photo, image=None):
        """Adds a live listing (an upsert); returns {"id", "category", "image"}. ListingExists (409) when it is
        live already."""
        item_id, category = self.checked(item_id, category, self.catalogue)
        vector = self.embed(photo)
        with self.lock:
            if self.catalogue.contains(item_id):
                raise ListingExists(f"listing {item_id!r} is already in the catalogue: remove it first to replace it")
            image, _ = self.with_photo(item_id, category, photo, image,
                                       lambda image: self.catalogue.upsert(item_id, category, str(image), vector))
        return {"seq": None, "id": item_id, "category": category, "image": str(image)}

    def remove(self, item_id):
        """Removes a live listing (a delete by id); returns {"id"}. UnknownListingError (404) when it is not live."""
        item_id = read_listing(check_plain("id", item_id), None, True)
        with self.lock:
            if not self.catalogue.contains(item_id):
                raise UnknownListingError(f"unknown listing id {item_id!r}: not in the catalogue")
            self.catalogue.delete(item_id)
        return {"seq": None, "id": item_id}

    def state(self, item_id):
        return {"id": item_id, "state": "live" if self.catalogue.contains(item_id) else "unknown", "seq": None}

    def status(self):
        return {"line": self.line, "engine": "milvus", "collection": self.catalogue.settings.collection,
                "live_items": self.catalogue.live_count}


def milvus_of(args):
    """The MilvusSettings the options name, or None (the line's catalogue is a folder with a change log)."""
    if not args.milvus_collection:
        return None
    return MilvusSettings(args.milvus_uri, args.milvus_collection, token_file=args.milvus_token_file,
                          token_env=args.milvus_token_env)


def writer_of(args):
    """The ListingWriter the options name: --bundle, else the line's latest recorded version; --changes, else
    <model store>/<name>.changes.sqlite; --images, else the latest version's catalogue image folder."""
    latest = latest_version(args.model_store, args.name)
    bundle = args.bundle or (latest or {}).get("bundle")
    if not bundle:
        raise InputError(f"no version of {args.name!r} is recorded in {args.model_store}: record one with "
                         f"`python -m training.next_version --name {args.name} --bundle BUNDLE`, or pass --bundle")
    # the catalogue image folder: given, else the latest version's, else the one the bundle records
    images = args.images or (latest or {}).get("data_dir") or read_manifest(bundle).get("image_root")
    milvus = milvus_of(args)
    if milvus is not None:
        return MilvusListingWriter(bundle, milvus, args.name, images)
    return ListingWriter(bundle, args.changes or changes_path(args.model_store, args.name), args.name, images,
                         args.max_unfolded)


def add_line_options(p):
    p.add_argument("--name", default="visual-search", help="the model line")
    p.add_argument("--model-store", default=str(MODEL_STORE))
    p.add_argument("--bundle", default=None, help="the bundle that embeds added photos (default: the latest "
                                                  "recorded version's)")
    p.add_argument("--changes", default=None, help="the change log (default: <model store>/<name>.changes.sqlite)")
    p.add_argument("--images", default=None, help="the catalogue image folder added photos go to (default: the "
                                                  "latest version's, else the bundle's)")
    p.add_argument("--max-unfolded", type=int, default=MAX_UNFOLDED)
    p.add_argument("--milvus-uri", default=None, help="the line's Milvus server (with --milvus-collection)")
    p.add_argument("--milvus-collection", default=None, help="write to this collection instead of the change log")
    p.add_argument("--milvus-token-file", default=None)
    p.add_argument("--milvus-token-env", default=TOKEN_ENV)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    add_line_options(p)
    commands = p.add_subparsers(dest="command", required=True)
    c = commands.add_parser("add", help="add a listing: its id, category and photo")
    c.add_argument("--id", required=True)
    c.add_argument("--category", required=True)
    c.add_argument("--photo", required=True, help="the photo file, embedded by the line's bundle")
    c.add_argument("--image", default=None, help="the listing's image reference (default: the photo, copied into "
                                                 "the catalogue image folder)")
    c = commands.add_parser("remove", help="remove listings by id")
    c.add_argument("ids", nargs="+")
    commands.add_parser("status", help="the line's log: last change, unfolded changes, live listings")
    c = commands.add_parser("api", help="serve the HTTP write API")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=8083)
    c.add_argument("--key-file", default=None, help="the API's bearer key (default: <model store>/.listings-key.json, "
                                                    "made at the first start)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    try:
        if args.command == "api":
            from serving.listings_api import serve  # noqa: PLC0415 (FastAPI only for the API)
            return serve(args)
        writer = writer_of(args)
        try:
            if args.command == "add":
                print(json.dumps(writer.add(args.id, args.category, Path(args.photo).read_bytes(), args.image)),
                      flush=True)
            elif args.command == "remove":
                for item_id in args.ids:
                    print(json.dumps(writer.remove(item_id)), flush=True)
            else:
                print(json.dumps(writer.status(), indent=2))
        finally:
            writer.close()
    except (VisualSearchError, OSError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
