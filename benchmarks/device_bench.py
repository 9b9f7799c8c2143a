"""The device check: one run on the lent GPU, (a) the handler's own path at batch 64 and 256 in three settings and
(b) TorchServe under Locust where it can; --dry-run proves the script on the CPU in seconds."""
import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from loadtests.photos import load_photos
from tests.harness import load_handler, synthetic_bundle, throughput
from visual_search.cli import HelpFormatter

USAGE = """examples:
  python -m benchmarks.device_bench
  python -m benchmarks.device_bench --dry-run
"""

SETTINGS = {"fp32": [], "fp16+cl+gpu-decode": ["--precision", "fp16", "--channels-last", "--gpu-decode"],
            "bf16+cl+gpu-decode": ["--precision", "bf16", "--channels-last", "--gpu-decode"],
            "fp16+cl+compile+gpu-decode": ["--precision", "fp16", "--channels-last", "--compile", "--gpu-decode"]}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--seconds", type=float, default=8, help="per measurement")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--served", choices=["auto", "no"], default="auto")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def served_missing():
    """Why TorchServe under Locust cannot run here, or None."""
    missing = [m for m in ("ts", "model_archiver", "locust") if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed: {', '.join(missing)}"
    from serving.torchserve import TorchServeError, java_home  # noqa: PLC0415
    try:
        java_home()
    except TorchServeError as error:
        return str(error)
    return None


def main(argv=None):
    args = get_args(argv)
    size, batches = (32, [2, 4]) if args.dry_run else (225, [int(b) for b in args.batches.split(",")])
    seconds = 1 if args.dry_run else args.seconds
    device = "cuda" if torch.cuda.is_available() else "cpu"
    photos, rows = load_photos(count=64), []
    from serving.build_archive import main as build_archive  # noqa: PLC0415 (needs torch-model-archiver)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = synthetic_bundle(tmp / "bundle", size, photos[:16], catalogue_size=2_000 if args.dry_run else 100_000)
        for name in args.settings.split(","):
            for batch in batches:
                store, work = tmp / f"store-{name}-{batch}", tmp / f"work-{name}-{batch}"
                try:
                    build_archive(["--bundle", str(bundle), "--name", "dev", "--model-store", str(store),
                                   "--batch-size", str(batch), *SETTINGS[name]])
                    started = time.perf_counter()
                    handler = load_handler(store / "dev.mar", work, batch, device)
                    load_s = time.perf_counter() - started
                    rate = throughput(handler, photos, batch, ["similar"], seconds)
                    rows.append({"part": "a", "settings": name, "batch": batch, "images_per_s": rate,
                                 "load_s": load_s, "applied": handler.service.runtime.settings.to_dict()})
                    del handler
                except Exception as error:  # one failed setting must not lose the others' figures
                    traceback.print_exc()
                    rows.append({"part": "a", "settings": name, "batch": batch, "error": repr(error)[:200]})
                shutil.rmtree(work, ignore_errors=True)
                shutil.rmtree(store, ignore_errors=True)
    why = "--served no" if args.served == "no" else served_missing()
    if why is None:
        from benchmarks.benchmark import main as benchmark  # noqa: PLC0415
        out = Path(tempfile.mkdtemp(prefix="device-served-"))
        flags = ["--image-size", str(size), "--batch-size", str(batches[0]), "--max-batch-delay", "5",
                 "--inprocess-seconds", str(seconds), "--out", str(out),
                 "--users", "1,2" if args.dry_run else "64,256,512", "--step-time", "5s" if args.dry_run else "30s"]
        if device == "cuda":
            flags += ["--runtime", *SETTINGS["fp16+cl+gpu-decode"]]
        benchmark(flags)
        result = json.loads((out / "benchmark.json").read_text())
        served = result["served"]
        rows.append({"part": "b", "settings": "served", "batch": batches[0],
                     "images_per_s": served["saturated"]["requests_per_s"],
                     "p50_ms": served["moderate"]["p50_ms"], "p99_ms": served["moderate"]["p99_ms"]})
    else:
        rows.append({"part": "b", "settings": "served", "error": f"skipped: {why}"})
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    print(f"\n{gpu}, torch {torch.__version__}, ResNet-50 at {size}px, 640x480 JPEG bodies, decoding included")
    print(f"{'part':<5}{'settings':<30}{'batch':>6}{'images/s':>12}  notes")
    for row in rows:
        note = row.get("error") or (f"load {row['load_s']:.1f}s" if "load_s" in row else
                                    f"p50 {row.get('p50_ms')} ms, p99 {row.get('p99_ms')} ms")
        rate = f"{row['images_per_s']:.1f}" if "images_per_s" in row else "-"
        print(f"{row['part']:<5}{row['settings']:<30}{row.get('batch', ''):>6}{rate:>12}  {note}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
