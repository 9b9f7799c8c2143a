"""Serve the archives already built in the model store with TorchServe; builds nothing. The version of each model:
--models, else $VISUAL_SEARCH_MODELS, else the default serving.manage recorded, else the only (or highest) one.
While it runs, a small process renews the token keys before they expire."""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from serving.management_client import HISTORY_FILE, ManagementError
from serving.torchserve import (
    DEFAULT_CONFIG,
    DEFAULT_STATE,
    MODEL_STORE,
    ROOT,
    TorchServe,
    TorchServeError,
    archive_identity,
)
from visual_search.cli import HelpFormatter
from visual_search.fileio import write_atomically

USAGE = """examples:
  python -m serving.serve start                    # one archive per model, waits until ready
  python -m serving.serve start --models visual-search=visual-search-v1.mar
  python -m serving.serve status
  python -m serving.serve stop
  python -m serving.serve start --foreground       # until TorchServe exits or SIGTERM (containers)
"""

MODELS_ENV = "VISUAL_SEARCH_MODELS"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("action", choices=["start", "stop", "status", "renew-keys"],
                   help="renew-keys: renew the token keys before they expire, while TorchServe runs (start runs it)")
    p.add_argument("--models", nargs="*", default=None,
                   help=f"archives in the model store, or name=archive (default: ${MODELS_ENV}, else one per model)")
    p.add_argument("--model-store", default=str(MODEL_STORE))
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--state-dir", default=str(DEFAULT_STATE))
    p.add_argument("--timeout", type=int, default=300, help="seconds to wait for the workers")
    p.add_argument("--foreground", action="store_true", help="after start, stay until TorchServe exits; "
                                                              "SIGTERM or Ctrl-C stops it")
    p.add_argument("--require-choice", action="store_true",
                   help="a model with several versions in the store and no version chosen (--models, "
                        f"${MODELS_ENV} or a recorded default) is an error instead of serving the highest")
    return p.parse_args(argv)


RENEWAL_PID = "key-renewal.pid"


def renewal_pid(state_dir):
    """The pid of the running key renewal of this state folder, or None."""
    try:
        pid = int((Path(state_dir) / RENEWAL_PID).read_text().strip())
        if b"renew-keys" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    except (OSError, ValueError):
        pass
    return None


def start_key_renewal(args):
    """A detached `renew-keys` process beside TorchServe (token authorization on: a key file exists)."""
    command = [sys.executable, "-m", "serving.serve", "renew-keys", "--state-dir", args.state_dir,
               "--config", args.config, "--model-store", args.model_store]
    with open(Path(args.state_dir) / "key-renewal.log", "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=ROOT)
    write_atomically(Path(args.state_dir) / RENEWAL_PID, f"{process.pid}\n", replace=True)


def stop_key_renewal(state_dir):
    pid = renewal_pid(state_dir)
    if pid:
        os.kill(pid, signal.SIGTERM)
    (Path(state_dir) / RENEWAL_PID).unlink(missing_ok=True)


def renew_keys_while_running(server, stopping):
    """Renews the inference and management keys at half their lifetime until TorchServe stops or `stopping` is set."""
    every = server.key_lifetime_seconds() / 2
    while not stopping.wait(every) and server.running():
        try:
            server.renew_keys()
            print(f"{time.strftime('%H:%M:%S')} keys renewed", flush=True)
        except TorchServeError as error:
            print(f"{time.strftime('%H:%M:%S')} key renewal failed: {error}", flush=True)


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
            if server.key_file.is_file() and not args.foreground:
                stop_key_renewal(args.state_dir)
                start_key_renewal(args)
            if args.foreground:
                if server.key_file.is_file():
                    threading.Thread(target=renew_keys_while_running, args=(server, threading.Event()),
                                     daemon=True).start()
                stay_in_foreground(server)
        elif args.action == "renew-keys":
            renew_keys_while_running(server, threading.Event())
        elif args.action == "stop":
            stop_key_renewal(args.state_dir)
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
