"""Pack a search bundle, the handler and the visual_search package into model_store/<name>.mar.

    python -m serving.build_archive --bundle runs/x/bundle --name visual-search --version 1.0
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from visual_search.bundle import BUNDLE_FILES, load_bundle

ROOT = Path(__file__).resolve().parent.parent
HANDLER = ROOT / "handler" / "visual_search_handler.py"
PACKAGE = ROOT / "visual_search"


def model_config(args):
    """TorchServe's per-model settings, read by the frontend and, under "handler", by our handler."""
    return {
        "batchSize": args.batch_size,
        "maxBatchDelay": args.max_batch_delay,
        "minWorkers": args.workers,
        "maxWorkers": args.max_workers or args.workers,
        "responseTimeout": args.response_timeout,
        "startupTimeout": args.startup_timeout,
        "handler": {"default_k": args.default_k, "max_k": args.max_k},
    }


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle folder written by training.build_index")
    p.add_argument("--name", default="visual-search", help="model name in TorchServe's URLs")
    p.add_argument("--version", default="1.0")
    p.add_argument("--model-store", default=str(ROOT / "model_store"))
    p.add_argument("--out-name", default=None, help="archive file name without .mar (default: --name)")
    p.add_argument("--batch-size", type=int, default=8, help="TorchServe's dynamic batch size")
    p.add_argument("--max-batch-delay", type=int, default=50, help="ms to wait for a batch to fill")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-workers", type=int, default=None)
    p.add_argument("--response-timeout", type=int, default=120, help="s")
    p.add_argument("--startup-timeout", type=int, default=300, help="s")
    p.add_argument("--default-k", type=int, default=4)
    p.add_argument("--max-k", type=int, default=100)
    return p.parse_args(argv)


def build_archive(args):
    bundle_dir = Path(args.bundle)
    load_bundle(bundle_dir)  # refuse to pack an inconsistent bundle
    store = Path(args.model_store)
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "extra"
        staging.mkdir()
        for name in BUNDLE_FILES:
            shutil.copy2(bundle_dir / name, staging / name)
        shutil.copytree(PACKAGE, staging / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        config = Path(tmp) / "model-config.yaml"
        config.write_text(yaml.safe_dump(model_config(args), sort_keys=False))
        command = [
            "torch-model-archiver", "--model-name", args.out_name or args.name, "--version", args.version,
            "--handler", str(HANDLER), "--extra-files", str(staging), "--config-file", str(config),
            "--export-path", str(store), "--force",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"torch-model-archiver failed ({result.returncode}):\n{result.stderr or result.stdout}")
    archive = store / f"{args.out_name or args.name}.mar"
    print(f"wrote {archive} ({archive.stat().st_size / 1e6:.1f} MB), version {args.version}")
    return archive


def main(argv=None):
    return build_archive(get_args(argv))


if __name__ == "__main__":
    main()
