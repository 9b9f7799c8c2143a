"""Pack a bundle and the handler, with the visual_search modules it imports, into <model store>/<name>.mar. The
runtime options rewrite the archived manifest's runtime section; a bundled catalogue travels in the archive, an
outside one is named (--catalogue-dir: where serving hosts hold it, relative to $VISUAL_SEARCH_CATALOGUES)."""
import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

from serving.torchserve import MODEL_STORE, ROOT, tool
from visual_search.bundle import CATALOGUE_DIR, MANIFEST_FILE, MODEL_FILE, bundle_files, check_runtime, load_bundle
from visual_search.catalogue import verify_catalogue
from visual_search.catalogue.changes import CHANGES_SUFFIX
from visual_search.catalogue.manifest import MANIFEST_FILE as CATALOGUE_MANIFEST
from visual_search.catalogue.milvus import DEFAULT_TIMEOUT, TOKEN_ENV, MilvusSettings, collection_reference
from visual_search.cli import HelpFormatter
from visual_search.errors import BundleError
from visual_search.fileio import copy_into, write_atomically
from visual_search.runtime_settings import ENGINE_PRECISIONS, ENGINES, RuntimeSettings, check_catalogue_runtime

USAGE = """examples:
  python -m serving.build_archive --bundle runs/x/bundle --name visual-search --version 1.0
  python -m serving.build_archive ... --precision fp16 --channels-last --compile --gpu-decode
  python -m serving.build_archive ... --engine torch --precision fp32     # a bundle's model.pt, e.g. for a GPU
  python -m serving.build_archive ... --catalogue-dir shop-v3 --threads 4
  python -m serving.build_archive ... --milvus-uri http://milvus:19530 --milvus-collection shop_v3
"""

HANDLER = ROOT / "handler" / "visual_search_handler.py"
PACKAGE = ROOT / "visual_search"
# batchSize and maxBatchDelay per runtime on a CPU (docs/performance.md says which were measured); GPUs: set them
SERVING_DEFAULTS = {
    "torch-fp32": {"batch_size": 4, "max_batch_delay": 5},
    "openvino-fp32": {"batch_size": 4, "max_batch_delay": 5},
    "openvino-bf16": {"batch_size": 4, "max_batch_delay": 5},
    "openvino-int8": {"batch_size": 4, "max_batch_delay": 5},
}


def milvus_settings(args):
    """The MilvusSettings the options name, or None (the catalogue is a folder)."""
    if not args.milvus_collection:
        return None
    if not args.milvus_uri:
        sys.exit("error: --milvus-collection needs --milvus-uri")
    if args.milvus_timeout >= args.response_timeout:
        sys.exit(f"error: --milvus-timeout ({args.milvus_timeout:g} s) must be under --response-timeout "
                 f"({args.response_timeout} s), so that a slow Milvus gets its 503 before TorchServe gives up")
    return MilvusSettings(args.milvus_uri, args.milvus_collection, token_file=args.milvus_token_file,
                          token_env=args.milvus_token_env, timeout=args.milvus_timeout)


def model_config(args):
    """TorchServe's per-model settings, read by the frontend and, under "handler", by our handler. With Milvus,
    the handler's `milvus` section names the collection (no token) and there is no change log: Milvus keeps the
    live changes itself."""
    milvus = milvus_settings(args)
    if milvus is not None:
        catalogue = {"milvus": milvus.to_dict()}
    else:
        catalogue = {**({"catalogue_dir": args.catalogue_dir} if args.catalogue_dir else {}),
                     **({"changes": changes_setting(args)} if not args.no_changes else {})}
    return {
        "batchSize": args.batch_size,
        "maxBatchDelay": args.max_batch_delay,
        "minWorkers": args.workers,
        "maxWorkers": args.max_workers or args.workers,
        "responseTimeout": args.response_timeout,
        "startupTimeout": args.startup_timeout,
        "handler": {"default_k": args.default_k, "max_k": args.max_k, **catalogue,
                    **({"threads": args.threads} if args.threads else {})},
    }


def changes_setting(args):
    """The change log the workers follow: --changes as given, or <model store>/<name>.changes.sqlite."""
    return args.changes or str((Path(args.model_store) / f"{args.name}{CHANGES_SUFFIX}").resolve())


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle folder written by training.build_index")
    p.add_argument("--name", default="visual-search", help="model name in TorchServe's URLs")
    p.add_argument("--version", default="1.0")
    p.add_argument("--model-store", default=str(MODEL_STORE))
    p.add_argument("--out-name", default=None, help="archive file name without .mar (default: --name); the model "
                                                    "name inside the archive stays --name")
    p.add_argument("--batch-size", type=int, default=None,
                   help="TorchServe's dynamic batch size (default: measured for the archive's runtime on a CPU, "
                        "docs/performance.md, which has the GPU settings too)")
    p.add_argument("--max-batch-delay", type=int, default=None,
                   help="ms to wait for a batch to fill (default: measured for the archive's runtime)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-workers", type=int, default=None)
    p.add_argument("--changes", default=None,
                   help="the catalogue line's change log, which the workers follow (default: "
                        "<model store>/<name>.changes.sqlite; relative: under $VISUAL_SEARCH_CATALOGUES)")
    p.add_argument("--no-changes", action="store_true", help="serve the sealed catalogue alone, no live changes")
    p.add_argument("--replace", action="store_true", help="replace an archive of the same file name (atomically); "
                                                           "without it an existing archive is refused")
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
    milvus = p.add_argument_group("milvus", "the catalogue as a Milvus collection instead of a folder (published by "
                                            "training.publish_milvus; docs/milvus.md)")
    milvus.add_argument("--milvus-uri", default=None, help="e.g. http://milvus:19530 ($VISUAL_SEARCH_MILVUS_URI "
                                                          "overrides it where the workers run)")
    milvus.add_argument("--milvus-collection", default=None, help="the collection (or alias) the archive searches")
    milvus.add_argument("--milvus-token-file", default=None, help="a file on the serving hosts holding the token")
    milvus.add_argument("--milvus-token-env", default=TOKEN_ENV, help="else the env var holding it")
    milvus.add_argument("--milvus-timeout", type=float, default=DEFAULT_TIMEOUT, help="s per Milvus call")
    runtime = p.add_argument_group("runtime", "unset options keep the bundle's runtime section (the one that "
                                              "embedded its catalogue); the catalogue must fit the runtime")
    runtime.add_argument("--engine", choices=ENGINES, default=None,
                         help="openvino: the bundle's IR on the CPU (torch on CUDA); torch: model.pt")
    runtime.add_argument("--precision", choices=sorted({p for ps in ENGINE_PRECISIONS.values() for p in ps}),
                         default=None, help="torch: fp32, or fp16 and bf16 on CUDA only (fp16 keeps fp32's "
                                            "neighbours); openvino: fp32, bf16 (an fp32 IR) or int8 (an int8 IR)")
    flag = argparse.BooleanOptionalAction
    runtime.add_argument("--channels-last", action=flag, default=None)
    runtime.add_argument("--compile", action=flag, default=None, help="torch.compile at load time")
    runtime.add_argument("--gpu-decode", action=flag, default=None, help="decode JPEG batches on CUDA")
    return p.parse_args(argv)


def archive_runtime(manifest, args):
    """The bundle's runtime section with the options that were given; a new engine starts from its defaults."""
    given = {k: getattr(args, k) for k in RuntimeSettings.__dataclass_fields__ if getattr(args, k) is not None}
    section = dict(manifest.get("runtime") or {})
    if given.get("engine", section.get("engine", "torch")) != section.get("engine", "torch"):
        section = {}
    try:
        return RuntimeSettings.from_dict({**section, **given})
    except ValueError as error:
        sys.exit(f"error: runtime {({**section, **given})}: {error}")


def set_runtime(manifest_path, args, catalogue_manifest):
    """Writes the runtime into the manifest at `manifest_path`, after checking that the bundle has its model and
    that the catalogue's vectors fit it; returns the section."""
    manifest = json.loads(manifest_path.read_text())
    settings = archive_runtime(manifest, args)
    manifest["runtime"] = settings.to_dict()
    try:
        check_runtime(manifest_path.parent, manifest)
        check_catalogue_runtime(catalogue_manifest, settings, where="this archive")
    except BundleError as error:
        sys.exit(f"error: {error}")
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest["runtime"]


def pin_collection(manifest_path, reference):
    """Writes the collection's reference (uid, count, dimension, normalisation) as the archived manifest's
    catalogue: the workers refuse any other collection."""
    manifest = json.loads(manifest_path.read_text())
    manifest["catalogue"] = reference
    manifest_path.write_text(json.dumps(manifest, indent=2))


IMPORTED_BY_HANDLER = """
import importlib.util, json, sys
sys.path.insert(0, sys.argv[1])
spec = importlib.util.spec_from_file_location("visual_search_handler", sys.argv[2])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(json.dumps(sorted(m.__file__ for name, m in sys.modules.items()
                        if name.split(".")[0] == "visual_search" and getattr(m, "__file__", None))))
"""


@functools.cache
def handler_modules():
    """The files of the visual_search package that importing the handler loads, found in a clean interpreter,
    relative to the checkout: the archive ships these and nothing else of the package."""
    result = subprocess.run([sys.executable, "-c", IMPORTED_BY_HANDLER, str(ROOT), str(HANDLER)], capture_output=True,
                            text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"error: the handler does not import cleanly:\n{result.stderr[-3000:]}")
    files = [Path(path).resolve().relative_to(ROOT) for path in json.loads(result.stdout.strip().splitlines()[-1])]
    return sorted(files)


def verify_archive(path):
    """Checks an archive against its own records, in full: model.pt against the manifest's weights sha256 and,
    when the catalogue is bundled, every catalogue file against catalogue.json. Returns the manifest; raises
    BundleError naming the first file that differs."""
    with zipfile.ZipFile(path) as archive:
        if MANIFEST_FILE not in archive.namelist():
            raise BundleError(f"{path} is not an archive of this project: it holds no {MANIFEST_FILE}")
        manifest = json.loads(archive.read(MANIFEST_FILE))
        expected = {MODEL_FILE: manifest.get("weights_sha256"), **((manifest.get("openvino") or {}).get("files") or {})}
        if f"{CATALOGUE_DIR}/{CATALOGUE_MANIFEST}" in archive.namelist():
            catalogue = json.loads(archive.read(f"{CATALOGUE_DIR}/{CATALOGUE_MANIFEST}"))
            expected.update({f"{CATALOGUE_DIR}/{name}": record["sha256"]
                             for name, record in catalogue["files"].items()})
        for name, sha in expected.items():
            digest = hashlib.sha256()
            with archive.open(name) as member:
                for block in iter(lambda member=member: member.read(8 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != sha:
                raise BundleError(f"{path}: {name} does not match its sha256")
    return manifest


def build_archive(args):
    bundle_dir = Path(args.bundle)
    milvus = milvus_settings(args)
    # refuse to pack an inconsistent bundle, or a collection of other vectors
    bundle = load_bundle(bundle_dir, catalogue_dir=args.catalogue_dir, milvus=milvus)
    bundled = bundle.manifest["catalogue"].get("bundled", False) and milvus is None
    folder = bundle.catalogue.folder
    reference = collection_reference(milvus, bundle.catalogue.identity) if milvus is not None else None
    bundle.catalogue.close()
    name = archive_runtime(bundle.manifest, args).name
    measured = SERVING_DEFAULTS.get(name, SERVING_DEFAULTS["torch-fp32"])
    args.batch_size = args.batch_size or measured["batch_size"]
    args.max_batch_delay = measured["max_batch_delay"] if args.max_batch_delay is None else args.max_batch_delay
    if bundled and args.catalogue_dir:
        sys.exit(f"{bundle_dir} bundles its catalogue; --catalogue-dir is for a catalogue outside the bundle")
    store = Path(args.model_store)
    archive = store / f"{args.out_name or args.name}.mar"
    if archive.exists() and not args.replace:
        sys.exit(f"error: {archive} exists: an archive is written once (a new version gets a new name), or pass "
                 f"--replace")
    if milvus is None:
        verify_catalogue(folder)  # the full sha256 of every file, before anything is packed
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "extra"
        staging.mkdir()
        for name in bundle_files(bundle.manifest):
            shutil.copy2(bundle_dir / name, staging / name)
        if bundled:
            shutil.copytree(bundle_dir / CATALOGUE_DIR, staging / CATALOGUE_DIR)
        runtime = set_runtime(staging / MANIFEST_FILE, args, bundle.catalogue.manifest)
        if reference is not None:
            pin_collection(staging / MANIFEST_FILE, reference)
        for module in handler_modules():
            (staging / module).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / module, staging / module)
        config = Path(tmp) / "model-config.yaml"
        config.write_text(yaml.safe_dump(model_config(args), sort_keys=False))
        command = [
            tool("torch-model-archiver"), "--model-name", args.name, "--version", args.version,
            "--handler", str(HANDLER), "--extra-files", str(staging), "--config-file", str(config),
            "--export-path", tmp, "--force",
        ]
        # the archiver stages files in <temp dir>/<model name>: a temp dir of this run's own, so that two builds of
        # one model name at once never share (and delete) each other's files
        scratch = Path(tmp) / "archiver-tmp"
        scratch.mkdir()
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(scratch)})
        if result.returncode != 0:
            sys.exit(f"torch-model-archiver failed ({result.returncode}):\n{result.stderr or result.stdout}")
        # The archiver names the file after the model; --out-name renames only the file (e.g. name-v2.mar).
        built = Path(tmp) / f"{args.name}.mar"
        write_atomically(archive, lambda f: copy_into(built, f), replace=args.replace)
    where = "bundled" if bundled else f"outside, at {args.catalogue_dir or bundle.manifest['catalogue']['path']}"
    if milvus is not None:
        where = f"{milvus.where()}, uid {reference['uid']}"
    print(f"wrote {archive} ({archive.stat().st_size / 1e6:.1f} MB), version {args.version}, catalogue {where} "
          f"({bundle.catalogue.count} items), runtime {runtime}, batch {args.batch_size} within "
          f"{args.max_batch_delay} ms")
    return archive


def main(argv=None):
    return build_archive(get_args(argv))


if __name__ == "__main__":
    main()
