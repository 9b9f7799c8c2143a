"""How long embedding a catalogue takes per runtime: synthetic 640x480 JPEG photos on disk, embedded as
training.build_index does (the DataLoader, the Runtime of the chosen runtime), the rate extrapolated to --target
items, plus each runtime's one-off cost (converting the IR; quantizing it on 300 photos). See docs/performance.md."""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from loadtests.photos import CATEGORIES, product_jpeg
from tests.harness import calibrated_model, photo_tensors
from training.embedding import iter_embeddings
from training.optimize import CALIBRATION_PHOTOS, convert, quantize
from training.parity_gate import RUNTIME_NAMES
from visual_search.cli import HelpFormatter
from visual_search.items import Item
from visual_search.model import TrainedModel
from visual_search.preprocessing import PreprocessSettings
from visual_search.runtime import Runtime
from visual_search.runtime_settings import RuntimeSettings

USAGE = """examples:
  python -m benchmarks.catalogue_embedding --image-size 225 --photos 1000 --target 100000
"""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--image-size", type=int, default=225)
    p.add_argument("--photos", type=int, default=1000, help="photos embedded per runtime")
    p.add_argument("--target", type=int, default=100_000, help="the catalogue size the rate is extrapolated to")
    p.add_argument("--runtimes", default=",".join(RUNTIME_NAMES[1:]))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (build_index's default)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    return p.parse_args(argv)


def write_photos(root, count):
    items = []
    for i in range(count):
        category = CATEGORIES[i % len(CATEGORIES)]
        (root / category).mkdir(parents=True, exist_ok=True)
        (root / category / f"p{i:06d}.jpg").write_bytes(product_jpeg(i))
        items.append(Item(f"p{i:06d}", category, f"{category}/p{i:06d}.jpg"))
    return items


def main(argv=None):
    args = get_args(argv)
    preprocess = PreprocessSettings(image_size=args.image_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        items = write_photos(root, args.photos)
        photos = [(root / it.image).read_bytes() for it in items[:64]]
        model = calibrated_model(preprocess, photos[:16])
        irs, one_off = {}, {}
        for name in args.runtimes.split(","):
            settings = RuntimeSettings.named(name)
            ir, precision = None, None
            if settings.engine == "openvino":
                precision = "int8" if settings.precision == "int8" else "fp32"
                if "fp32" not in irs:
                    start = time.perf_counter()
                    irs["fp32"] = convert(model, args.image_size)
                    one_off["fp32"] = time.perf_counter() - start
                if precision == "int8" and "int8" not in irs:
                    tensors = [(root / it.image).read_bytes() for it in items[:CALIBRATION_PHOTOS]]
                    start = time.perf_counter()
                    calibration = [t.unsqueeze(0).numpy() for t in photo_tensors(preprocess, tensors)]
                    irs["int8"] = quantize(irs["fp32"], calibration)
                    one_off["int8"] = one_off["fp32"] + time.perf_counter() - start
                ir = irs[precision]
            runtime = Runtime(TrainedModel(model, preprocess, True, ir, precision), "cpu", settings)
            start, done = time.perf_counter(), 0
            for embeddings, _ in iter_embeddings(runtime, root, items, list(CATEGORIES), args.batch_size,
                                                 args.workers, desc=f"embedding, {name}"):
                done += len(embeddings)
            rate = done / (time.perf_counter() - start)
            rows.append({"runtime": name, "photos": done, "images_per_s": rate,
                         "one_off_s": one_off.get(precision, 0.0) if precision else 0.0,
                         "target": args.target, "target_hours": args.target / rate / 3600})
            print(f"{name}: {rate:.1f} images/s", flush=True)
    first = rows[0]["images_per_s"]
    print(f"\n{args.photos} synthetic 640x480 JPEGs at {args.image_size}px, batch {args.batch_size}, "
          f"{args.workers} loader workers")
    print(f"{'runtime':<14} {'images/s':>9} {'x first':>7} {'one-off s':>9} {f'{args.target:,} items':>14}")
    for row in rows:
        print(f"{row['runtime']:<14} {row['images_per_s']:>9.1f} {row['images_per_s'] / first:>7.2f} "
              f"{row['one_off_s']:>9.0f} {row['target_hours'] * 60:>10.0f} min")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
