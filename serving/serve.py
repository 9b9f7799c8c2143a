"""Serve the archives already built in model_store/ with TorchServe. Builds nothing.

    python -m serving.serve start            # one archive per model in model_store/, waits until ready
    python -m serving.serve start --models visual-search.mar     # or visual-search=visual-search-v1.mar
    python -m serving.serve status
    python -m serving.serve stop
    python -m serving.serve start --foreground   # stays until TorchServe exits or SIGTERM stops it (Docker)

Which version of each model starts: --models, else $VISUAL_SEARCH_MODELS (the same words, separated by spaces or
commas), else the default that serving.manage recorded last (default_history.json in the state folder), else the
only version in the store; with several versions and none of these, the highest, or with --require-choice (the
container image's setting) an error.

State (pid file, logs, key_file.json with the API tokens) lives in --state-dir (default .torchserve/).
"""
import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from serving.management import DEFAULT_STATE, HISTORY_FILE, ManagementError, archive_identity
from serving.torchserve import ROOT, DEFAULT_CONFIG, TorchServe, TorchServeError

MODELS_ENV = "VISUAL_SEARCH_MODELS"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--models", nargs="*", default=None,
                   help=f"archives in the model store, or name=archive (default: ${MODELS_ENV}, else one per model)")
    p.add_argument("--model-store", default=str(ROOT / "model_store"))
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--state-dir", default=str(DEFAULT_STATE))
    p.add_argument("--timeout", type=int, default=300, help="seconds to wait for the workers")
    p.add_argument("--foreground", action="store_true", help="after start, stay until TorchServe exits; "
                                                              "SIGTERM or Ctrl-C stops it")
    p.add_argument("--require-choice", action="store_true",
                   help="a model with several versions in the store and no version chosen (--models, "
                        f"${MODELS_ENV} or a recorded default) is an error instead of serving the highest")
    return p.parse_args(argv)


class NoVersionChosen(RuntimeError):
    """Several versions of a model are in the store and nothing says which one to serve."""


def models_from_env(environ=os.environ):
    """The archives named in $VISUAL_SEARCH_MODELS (separated by spaces or commas), or None when it is unset or
    empty."""
    words = [w for w in re.split(r"[\s,]+", environ.get(MODELS_ENV, "")) if w]
    return words or None


def stay_in_foreground(server):
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while server.running():
            time.sleep(2)
        sys.exit("TorchServe exited")
    finally:
        server.stop()


def version_key(version):
    return tuple(int(part) if part.isdigit() else -1 for part in version.split("."))


def startup_models(model_store, state_dir, given=None, require_choice=False):
    """name=archive pairs for `torchserve --models`, so that versioned archives (name-v2.mar) start under their
    model's name. Without `given`: one archive per model, the version that serving.manage last made the default
    (default_history.json in the state folder), else the only version in the store, else the highest one; with
    `require_choice`, several versions and no recorded default raise NoVersionChosen instead."""
    store = Path(model_store)
    if given is not None:
        return [m if "=" in m or not (store / m).is_file() else f"{archive_identity(store / m)[0]}={m}"
                for m in given]
    archives = {}
    for path in sorted(store.glob("*.mar")):
        name, version = archive_identity(path)
        archives.setdefault(name, {}).setdefault(version, path.name)
    history_file = Path(state_dir) / HISTORY_FILE
    history = json.loads(history_file.read_text()) if history_file.is_file() else {}
    models = []
    for name, by_version in sorted(archives.items()):
        recorded = [v for v in history.get(name, []) if v in by_version]
        if not recorded and len(by_version) > 1 and require_choice:
            versions = sorted(by_version, key=version_key)
            raise NoVersionChosen(
                f"{store} holds versions {', '.join(versions)} of {name} and none is chosen: set "
                f"{MODELS_ENV}={name}={by_version[versions[-1]]} (or another version's archive), or keep the "
                f"state folder {state_dir} on a volume so that the default recorded by serving.manage survives")
        version = recorded[-1] if recorded else max(by_version, key=version_key)
        models.append(f"{name}={by_version[version]}")
    return models


def main(argv=None):
    args = get_args(argv)
    server = TorchServe(args.state_dir, model_store=args.model_store, config=args.config)
    try:
        if args.action == "start":
            given = args.models if args.models is not None else models_from_env()
            models = startup_models(args.model_store, args.state_dir, given, args.require_choice)
            if not models:
                sys.exit(f"no archives in {args.model_store}: build one first (make demo)")
            server.start(models, timeout=args.timeout)
            print(f"TorchServe is ready with {', '.join(models)}\n"
                  f"  inference  {server.urls['inference']}\n  management {server.urls['management']}\n"
                  f"  metrics    {server.urls['metrics']}/metrics\n  keys       {server.key_file}", flush=True)
            if args.foreground:
                stay_in_foreground(server)
        elif args.action == "stop":
            server.stop()
            print("TorchServe stopped" if not server.running() else "TorchServe is still running")
        else:
            pid = server.pid()
            print(f"TorchServe running, pid {pid}, state in {server.state_dir}" if pid else "TorchServe not running")
            sys.exit(0 if pid else 3)
    except (TorchServeError, ManagementError, NoVersionChosen) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
