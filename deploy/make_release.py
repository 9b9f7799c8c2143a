"""Lay out one release for Kubernetes: <out>/model-store/ with a copy of each archive (with --threads, one whose
model-config.yaml sets handler.threads) and <out>/config/config.properties listing them, --default versions as
TorchServe's defaults. Written under a temporary name, fsynced and renamed: a release is never changed."""
import argparse
import json
import os
import shutil
import sys
import zipfile
import zlib
from pathlib import Path

import yaml

from serving.build_archive import verify_archive
from serving.torchserve import TorchServeError, archive_identity, read_archive, read_properties
from visual_search import fileio
from visual_search.cli import HelpFormatter

USAGE = """examples:
  python -m deploy.make_release --out /mnt/models-rw/visual-search/release-2 \
      model_store/visual-search-v2.mar model_store/visual-search-v1.mar --default visual-search=2.0
"""

TEMPLATE = Path(__file__).resolve().parent / "storage" / "config" / "config.properties"
SNAPSHOT_KEY = "model_snapshot"
ARCHIVE_MANIFEST = "MAR-INF/MANIFEST.json"


class ReleaseError(ValueError):
    pass


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("archives", nargs="+", help=".mar files (any folder)")
    p.add_argument("--out", required=True, help="the release folder to create")
    p.add_argument("--default", action="append", default=[], metavar="NAME=VERSION",
                   help="the default version of a model (needed when it has several archives)")
    p.add_argument("--template", default=str(TEMPLATE), help="the TorchServe config to start from")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-batch-delay", type=int, default=None, help="ms")
    p.add_argument("--workers", type=int, default=None, help="minWorkers and maxWorkers of each version")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch and FAISS threads of each worker of each version (handler.threads in each archive's "
                        "model-config.yaml; default: the archive's own setting)")
    return p.parse_args(argv)


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a whole number of at least 1")
    return value


def version_settings(template_snapshot, args):
    """The per-version settings: the template's first entry, with the options given."""
    try:
        first = next(iter(next(iter(template_snapshot["models"].values())).values()))
    except (KeyError, StopIteration, AttributeError):
        raise ReleaseError("the template's model_snapshot has no model version to copy settings from") from None
    settings = {k: v for k, v in first.items() if k not in ("defaultVersion", "marName")}
    if args.batch_size is not None:
        settings["batchSize"] = args.batch_size
    if args.max_batch_delay is not None:
        settings["maxBatchDelay"] = args.max_batch_delay
    if args.workers is not None:
        settings["minWorkers"] = settings["maxWorkers"] = args.workers
    return settings


def snapshot_for(archives, defaults, settings):
    """TorchServe's model_snapshot for these archives ({path: (name, version)}) and defaults ({name: version})."""
    models = {}
    for path, (name, version) in archives.items():
        if version in models.get(name, {}):
            raise ReleaseError(f"two archives hold {name} version {version}: {models[name][version]['marName']} "
                               f"and {path.name}")
        models.setdefault(name, {})[version] = {"defaultVersion": False, "marName": path.name, **settings}
    unknown = sorted(set(defaults) - set(models))
    if unknown:
        raise ReleaseError(f"--default names {', '.join(unknown)}, which no archive given holds")
    for name, versions in models.items():
        chosen = defaults.get(name) or (next(iter(versions)) if len(versions) == 1 else None)
        if chosen is None:
            raise ReleaseError(f"{name} has versions {', '.join(sorted(versions))}: say which one is the default "
                               f"with --default {name}=VERSION")
        if chosen not in versions:
            raise ReleaseError(f"--default {name}={chosen}: no archive given holds that version "
                               f"(given: {', '.join(sorted(versions))})")
        versions[chosen]["defaultVersion"] = True
    return {"name": "startup.cfg", "modelCount": len(models), "models": models}


def config_text(template_text, snapshot):
    """The template with its model_snapshot line replaced; every other line and comment kept."""
    line = f"{SNAPSHOT_KEY}={json.dumps(snapshot, separators=(',', ':'))}"
    lines = template_text.splitlines()
    at = [i for i, text in enumerate(lines) if text.split("=", 1)[0].strip() == SNAPSHOT_KEY]
    if len(at) != 1:
        raise ReleaseError(f"the template needs exactly one {SNAPSHOT_KEY}= line, it has {len(at)}")
    lines[at[0]] = line
    return "\n".join(lines) + "\n"


def parse_defaults(pairs):
    defaults = {}
    for pair in pairs:
        name, sep, version = pair.partition("=")
        if not sep or not name or not version:
            raise ReleaseError(f"--default {pair!r}: expected NAME=VERSION")
        defaults[name] = version
    return defaults


def archive_config_name(path):
    """The name of the archive's model-config.yaml: MAR-INF/MANIFEST.json's model.configFile."""
    try:
        archive = read_archive(path)
    except TorchServeError as error:
        raise ReleaseError(str(error)) from None
    name, present = archive.config_file, bool(archive.config)
    if not name or not present:
        raise ReleaseError(f"{path} has no model-config.yaml ({ARCHIVE_MANIFEST} model.configFile), so --threads "
                           f"has nowhere to go: build it with serving.build_archive")
    return name


def config_with_threads(text, threads):
    """model-config.yaml's text with handler.threads set; every other setting kept."""
    config = yaml.safe_load(text) or {}
    handler = (config.get("handler") or {}) if isinstance(config, dict) else None
    if not isinstance(handler, dict):
        raise ReleaseError("model-config.yaml is not a mapping with a handler mapping")
    config["handler"] = {**handler, "threads": threads}
    return yaml.safe_dump(config, sort_keys=False)


def write_archive_with_threads(source, file, threads):
    """Writes to `file` the archive `source` with handler.threads set in its model-config.yaml; every other entry
    is copied unchanged (name, date, attributes, compression method and content)."""
    config_name = archive_config_name(source)
    try:
        copy_archive(source, file, config_name, threads)
    except (zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ReleaseError(f"{source}: {error}") from None


def copy_archive(source, file, config_name, threads):
    """Copies every entry of `source` into the zip `file`, the one named `config_name` with handler.threads set."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(file, "w") as copy:
        copy.comment = original.comment
        for entry in original.infolist():
            info = zipfile.ZipInfo(entry.filename, entry.date_time)
            info.compress_type, info.external_attr = entry.compress_type, entry.external_attr
            info.create_system, info.comment = entry.create_system, entry.comment
            if entry.filename == config_name:
                copy.writestr(info, config_with_threads(original.read(entry).decode("utf-8"), threads))
            elif entry.is_dir():
                copy.writestr(info, b"")
            else:
                info.file_size = entry.file_size  # lets zipfile choose ZIP64 for entries of 2 GiB and more
                with original.open(entry) as reader, copy.open(info, "w") as writer:
                    shutil.copyfileobj(reader, writer, 1 << 20)


def make_folders(folder):
    """Creates `folder` and any missing parent, each one fsync'd into its parent; returns those it created,
    deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
        fileio.fsync_dir(created.parent)
    return missing


def write_release(out, archives, config, threads):
    """Writes the release folder `out` under a temporary name beside it and renames it into place."""
    created = make_folders(out.parent)
    staging = fileio.temporary_name(out)
    try:
        staging.mkdir()
        for folder in ("model-store", "config"):
            (staging / folder).mkdir()
        for path in archives:
            target = staging / "model-store" / path.name
            if threads is None:
                fileio.write_atomically(target, lambda file, path=path: fileio.copy_into(path, file), stat_from=path)
            else:
                fileio.write_atomically(target, lambda file, path=path: write_archive_with_threads(path, file, threads))
        fileio.write_atomically(staging / "config" / "config.properties", config)
        fileio.fsync_dir(staging)
        try:
            fileio.rename_noreplace(staging, out)
        except FileExistsError:
            raise ReleaseError(f"{out} appeared while the release was written: a release folder is never "
                               f"changed; make a new one") from None
        fileio.fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def make_release(args):
    out = Path(args.out)
    if os.path.lexists(out):
        raise ReleaseError(f"{out} already exists: a release folder is never changed; make a new one")
    template = Path(args.template)
    template_snapshot = json.loads(read_properties(template).get(SNAPSHOT_KEY, "null") or "null")
    if not template_snapshot:
        raise ReleaseError(f"{template} has no {SNAPSHOT_KEY}")
    archives = {Path(a): archive_identity(a) for a in args.archives}
    names = [p.name for p in archives]
    if len(set(names)) != len(names):
        raise ReleaseError("two archives have the same file name; the model store is one flat folder")
    snapshot = snapshot_for(archives, parse_defaults(args.default), version_settings(template_snapshot, args))
    text = config_text(template.read_text(), snapshot)
    for path in archives:  # refuse before writing anything
        verify_archive(path)  # every file against its sha256
        if args.threads is not None:
            archive_config_name(path)
    write_release(out, list(archives), text, args.threads)
    return snapshot


def main(argv=None):
    args = get_args(argv)
    try:
        snapshot = make_release(args)
    except (ReleaseError, TorchServeError, OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    for name, versions in snapshot["models"].items():
        for version, entry in sorted(versions.items()):
            mark = "default" if entry["defaultVersion"] else ""
            print(f"{name}  {version}  {entry['marName']}  {mark}")
    if args.threads is not None:
        print(f"{args.threads} threads per worker (handler.threads in each archive's model-config.yaml)")
    print(f"release written to {args.out}")
    return snapshot


if __name__ == "__main__":
    main()
