"""Pack a search bundle, the handler and the visual_search package into model_store/<name>.mar.

    python -m serving.build_archive --bundle runs/x/bundle --name visual-search --version 1.0
    python -m serving.build_archive ... --precision fp16 --channels-last --compile --gpu-decode   # GPU fast path
    python -m serving.build_archive ... --catalogue-dir shop-v3     # a catalogue outside, under $VISUAL_SEARCH_CATALOGUES

The runtime options rewrite the "runtime" section of the archived manifest.json; the bundle is left as it is.
A bundled catalogue (<bundle>/catalogue) travels in the archive. A catalogue outside the bundle does not: the
archive names it (its manifest's reference), and each host must hold it at the recorded path, or at
--catalogue-dir (stored in model-config.yaml; a relative path is taken under $VISUAL_SEARCH_CATALOGUES).
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from serving.torchserve import tool
from visual_search.bundle import BUNDLE_FILES, CATALOGUE_DIR, MANIFEST_FILE, load_bundle
from visual_search.cli import HelpFormatter
from visual_search.runtime import PRECISIONS, RuntimeSettings

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
        "handler": {"default_k": args.default_k, "max_k": args.max_k,
                    **({"catalogue_dir": args.catalogue_dir} if args.catalogue_dir else {}),
                    **({"threads": args.threads} if args.threads else {})},
    }


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle folder written by training.build_index")
    p.add_argument("--name", default="visual-search", help="model name in TorchServe's URLs")
    p.add_argument("--version", default="1.0")
    p.add_argument("--model-store", default=str(ROOT / "model_store"))
    p.add_argument("--out-name", default=None, help="archive file name without .mar (default: --name); the model "
                                                    "name inside the archive stays --name")
    p.add_argument("--batch-size", type=int, default=4,
                   help="TorchServe's dynamic batch size (4 measured best on 2 CPU cores; 64-256 on a GPU)")
    p.add_argument("--max-batch-delay", type=int, default=5,
                   help="ms to wait for a batch to fill (5 measured best on 2 CPU cores: a lone request then costs "
                        "what the model does)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-workers", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch and FAISS threads per worker (default: the host's CPUs, bounded by the cgroup quota and "
                        "$VISUAL_SEARCH_CPUS, shared among the live workers)")
    p.add_argument("--response-timeout", type=int, default=120, help="s")
    p.add_argument("--startup-timeout", type=int, default=300, help="s")
    p.add_argument("--default-k", type=int, default=4)
    p.add_argument("--max-k", type=int, default=100)
    p.add_argument("--catalogue-dir", default=None,
                   help="where serving hosts hold the bundle's outside catalogue, if not at the path it was "
                        "published to (relative: under $VISUAL_SEARCH_CATALOGUES)")
    runtime = p.add_argument_group("runtime", "the fast path; unset options keep the bundle's runtime section")
    runtime.add_argument("--precision", choices=list(PRECISIONS), default=None,
                         help="fp16 and bf16 apply on CUDA only; fp16 keeps fp32's neighbours")
    flag = argparse.BooleanOptionalAction
    runtime.add_argument("--channels-last", action=flag, default=None)
    runtime.add_argument("--compile", action=flag, default=None, help="torch.compile at load time")
    runtime.add_argument("--gpu-decode", action=flag, default=None, help="decode JPEG batches on CUDA")
    return p.parse_args(argv)


def set_runtime(manifest_path, args):
    """Writes the runtime options that were given into the manifest at `manifest_path`; returns the section."""
    manifest = json.loads(manifest_path.read_text())
    given = {k: getattr(args, k) for k in RuntimeSettings.__dataclass_fields__ if getattr(args, k) is not None}
    manifest["runtime"] = RuntimeSettings.from_dict({**manifest.get("runtime", {}), **given}).to_dict()
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest["runtime"]


def build_archive(args):
    bundle_dir = Path(args.bundle)
    bundle = load_bundle(bundle_dir, catalogue_dir=args.catalogue_dir)  # refuse to pack an inconsistent bundle
    bundled = bundle.manifest["catalogue"].get("bundled", False)
    bundle.catalogue.close()
    if bundled and args.catalogue_dir:
        sys.exit(f"{bundle_dir} bundles its catalogue; --catalogue-dir is for a catalogue outside the bundle")
    store = Path(args.model_store)
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "extra"
        staging.mkdir()
        for name in BUNDLE_FILES:
            shutil.copy2(bundle_dir / name, staging / name)
        if bundled:
            shutil.copytree(bundle_dir / CATALOGUE_DIR, staging / CATALOGUE_DIR)
        runtime = set_runtime(staging / MANIFEST_FILE, args)
        shutil.copytree(PACKAGE, staging / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        config = Path(tmp) / "model-config.yaml"
        config.write_text(yaml.safe_dump(model_config(args), sort_keys=False))
        command = [
            tool("torch-model-archiver"), "--model-name", args.name, "--version", args.version,
            "--handler", str(HANDLER), "--extra-files", str(staging), "--config-file", str(config),
            "--export-path", tmp, "--force",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"torch-model-archiver failed ({result.returncode}):\n{result.stderr or result.stdout}")
        # The archiver names the file after the model; --out-name renames only the file (e.g. name-v2.mar).
        archive = store / f"{args.out_name or args.name}.mar"
        shutil.move(Path(tmp) / f"{args.name}.mar", archive)
    where = "bundled" if bundled else f"outside, at {args.catalogue_dir or bundle.manifest['catalogue']['path']}"
    print(f"wrote {archive} ({archive.stat().st_size / 1e6:.1f} MB), version {args.version}, catalogue {where} "
          f"({bundle.catalogue.count} items), runtime {runtime}")
    return archive


def main(argv=None):
    return build_archive(get_args(argv))


if __name__ == "__main__":
    main()
