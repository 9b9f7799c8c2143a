"""Lay out one release for Kubernetes: the folder that KServe's TorchServe runtime and deploy/kubernetes/ serve.

    python -m deploy.make_release --out /mnt/models-rw/visual-search/release-2 \\
        model_store/visual-search-v2.mar model_store/visual-search-v1.mar --default visual-search=2.0

writes
    <out>/model-store/<archive>.mar           a copy of each archive given
    <out>/config/config.properties            deploy/storage/config/config.properties, its model_snapshot listing
                                              every archive given, with the --default version of each model as
                                              TorchServe's default version
Each version gets the batch and worker settings of the template's first snapshot entry, unless --batch-size,
--max-batch-delay or --workers say otherwise. A model with one archive needs no --default. The folder must not
exist yet: a release is never changed once pods serve it; the next one is a new folder.
Then point the Deployment's subPath, or the InferenceService's storageUri, at the new folder (docs/deploy.md).
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

from serving.management import ManagementError, archive_identity
from serving.torchserve import read_properties

TEMPLATE = Path(__file__).resolve().parent / "storage" / "config" / "config.properties"
SNAPSHOT_KEY = "model_snapshot"


class ReleaseError(ValueError):
    pass


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archives", nargs="+", help=".mar files (any folder)")
    p.add_argument("--out", required=True, help="the release folder to create")
    p.add_argument("--default", action="append", default=[], metavar="NAME=VERSION",
                   help="the default version of a model (needed when it has several archives)")
    p.add_argument("--template", default=str(TEMPLATE), help="the TorchServe config to start from")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-batch-delay", type=int, default=None, help="ms")
    p.add_argument("--workers", type=int, default=None, help="minWorkers and maxWorkers of each version")
    return p.parse_args(argv)


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


def make_release(args):
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ReleaseError(f"{out} already holds files: a release folder is never changed; make a new one")
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
    (out / "model-store").mkdir(parents=True, exist_ok=True)
    (out / "config").mkdir(exist_ok=True)
    for path in archives:
        shutil.copy2(path, out / "model-store" / path.name)
    (out / "config" / "config.properties").write_text(text)
    return snapshot


def main(argv=None):
    args = get_args(argv)
    try:
        snapshot = make_release(args)
    except (ReleaseError, ManagementError, OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    for name, versions in snapshot["models"].items():
        for version, entry in sorted(versions.items()):
            mark = "default" if entry["defaultVersion"] else ""
            print(f"{name}  {version}  {entry['marName']}  {mark}")
    print(f"release written to {args.out}")
    return snapshot


if __name__ == "__main__":
    main()
