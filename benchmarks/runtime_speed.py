"""The model alone per runtime (no decoding, no search): a seeded, calibrated ResNet-50 at --image-size, each
runtime's Runtime.embed at batch 1 and at --batch-size, in interleaved rounds so that load from other processes falls
on every runtime alike; the best and the median round per runtime, and the ratios to the first. See
docs/performance.md."""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from loadtests.photos import load_photos
from tests.harness import calibrated_model, photo_tensors, synthetic_ir
from training.parity_gate import RUNTIME_NAMES
from visual_search.cli import HelpFormatter
from visual_search.model import TrainedModel
from visual_search.preprocessing import PreprocessSettings
from visual_search.runtime import Runtime
from visual_search.runtime_settings import RuntimeSettings

USAGE = """examples:
  python -m benchmarks.runtime_speed --image-size 225 --batch-size 4 --rounds 5
"""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--image-size", type=int, default=225)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--runtimes", default=",".join(RUNTIME_NAMES[1:]))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0, help="per runtime, batch size and round")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def rate(runtime, batch, seconds):
    runtime.embed(batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        runtime.embed(batch)
        done += len(batch)
    return done / (time.perf_counter() - start)


def main(argv=None):
    args = get_args(argv)
    preprocess = PreprocessSettings(image_size=args.image_size)
    photos = load_photos(count=32)
    model = calibrated_model(preprocess, photos[:16])
    names = args.runtimes.split(",")
    irs, runtimes = {}, {}
    for name in names:
        settings = RuntimeSettings.named(name)
        source = TrainedModel(model, preprocess, True)
        if settings.engine == "openvino":
            precision = "int8" if settings.precision == "int8" else "fp32"
            if precision not in irs:
                irs[precision] = synthetic_ir(model, preprocess, photos, precision)
            source = TrainedModel(model, preprocess, True, irs[precision].model, precision)
        runtimes[name] = Runtime(source, "cpu", settings)
    tensors = photo_tensors(preprocess, photos)
    batches = {1: tensors[:1], args.batch_size: tensors[:args.batch_size]}
    rounds = {(name, size): [] for name in names for size in batches}
    for _ in range(args.rounds):
        for name in names:
            for size, batch in batches.items():
                rounds[(name, size)].append(rate(runtimes[name], batch, args.seconds))
    rows = [{"runtime": name, "batch": size, "best": max(values), "median": statistics.median(values),
             "rounds": values} for (name, size), values in rounds.items()]
    print(f"\n{torch.get_num_threads()} threads, ResNet-50 at {args.image_size}px, images/s over {args.rounds} "
          f"interleaved rounds of {args.seconds:.0f} s")
    print(f"{'runtime':<14} {'batch':>5} {'best':>7} {'median':>7} {'best x first':>12}")
    for row in rows:
        first = next(r for r in rows if r["runtime"] == names[0] and r["batch"] == row["batch"])
        print(f"{row['runtime']:<14} {row['batch']:>5} {row['best']:>7.1f} {row['median']:>7.1f} "
              f"{row['best'] / first['best']:>12.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
