"""A writer of one catalogue line that never stops on its own, for the fault-injection tests: it adds and removes
listings through serving.listings, folds the log into versions and publishes versions with new photos through
training.next_version, in a seeded random order, and prints one JSON line after each write that returned."""
import argparse
import json
import random
import shutil
import sys
from pathlib import Path

from loadtests.photos import CATEGORIES, encode, product_photo
from serving.listings import ListingWriter
from serving.version_record import changes_path, latest_version
from training.next_version import main as next_version
from visual_search.errors import VisualSearchError


def say(**line):
    print(json.dumps(line), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--model-store", required=True)
    p.add_argument("--work", required=True, help="a folder for the photos of published versions")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--first", choices=("add", "remove", "compact", "publish"), default=None,
                   help="the kind of write to begin with (the one the test kills inside); then random")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    first = args.first
    say(ready=True)
    while True:
        latest = latest_version(args.model_store, args.name)
        writer = ListingWriter(latest["bundle"], changes_path(args.model_store, args.name), args.name,
                               latest["data_dir"])
        try:
            for _ in range(rng.randint(1, 4)):
                wanted = first if first in ("add", "remove") else None
                first = None if wanted else first
                if wanted == "add" or (wanted is None and rng.random() < 0.5):
                    category = rng.choice(CATEGORIES)
                    item_id = f"live-{args.seed}-{rng.randrange(10 ** 9)}"
                    photo = encode(product_photo(category, rng.randrange(10 ** 6), size=(64, 48)), "JPEG")
                    say(begin="add")
                    done = writer.add(item_id, category, photo)
                    say(done="add", id=item_id, seq=done["seq"])
                else:
                    writer.follower.refresh()
                    live = [it.id for it in writer.bundle.catalogue.all_items()]
                    if len(live) > 12:
                        say(begin="remove")
                        done = writer.remove(rng.choice(live))
                        say(done="remove", id=done["id"], seq=done["seq"])
        except VisualSearchError as error:
            say(refused=str(error))
        finally:
            writer.close()
        argv = ["--name", args.name, "--model-store", args.model_store]
        wanted, first = first, None
        if wanted == "compact" or (wanted is None and rng.random() < 0.5):
            argv.append("--compact")
        else:  # a version with new photos, as an operator publishes one
            folder = Path(args.work) / f"new-{rng.randrange(10 ** 9)}"
            category = rng.choice(CATEGORIES)
            (folder / category).mkdir(parents=True)
            for i in range(2):
                photo = product_photo(category, rng.randrange(10 ** 6), size=(64, 48))
                (folder / category / f"{folder.name}-{i}.png").write_bytes(encode(photo, "PNG"))
            argv += ["--add", str(folder)]
        try:
            say(begin="compact" if "--compact" in argv else "publish")
            entry = next_version(argv)
            say(done="version", version=entry["version"])
        except SystemExit as stop:
            say(refused=str(stop))
        finally:
            if "--add" in argv:
                shutil.rmtree(argv[-1], ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
