"""Serve the archives already built in model_store/ with TorchServe. Builds nothing.

    python -m serving.serve start            # every .mar in model_store/, waits until ready
    python -m serving.serve start --models visual-search.mar
    python -m serving.serve status
    python -m serving.serve stop

State (pid file, logs, key_file.json with the API tokens) lives in --state-dir (default .torchserve/).
"""
import argparse
import sys
from pathlib import Path

from serving.torchserve import ROOT, DEFAULT_CONFIG, TorchServe, TorchServeError

DEFAULT_STATE = ROOT / ".torchserve"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--models", nargs="*", default=None, help="archives in the model store (default: all)")
    p.add_argument("--model-store", default=str(ROOT / "model_store"))
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--state-dir", default=str(DEFAULT_STATE))
    p.add_argument("--timeout", type=int, default=300, help="seconds to wait for the workers")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    server = TorchServe(args.state_dir, model_store=args.model_store, config=args.config)
    try:
        if args.action == "start":
            models = args.models if args.models is not None else sorted(
                p.name for p in Path(args.model_store).glob("*.mar"))
            if not models:
                sys.exit(f"no archives in {args.model_store}: build one first (make demo)")
            server.start(models, timeout=args.timeout)
            print(f"TorchServe is ready with {', '.join(models)}\n"
                  f"  inference  {server.urls['inference']}\n  management {server.urls['management']}\n"
                  f"  metrics    {server.urls['metrics']}/metrics\n  keys       {server.key_file}")
        elif args.action == "stop":
            server.stop()
            print("TorchServe stopped" if not server.running() else "TorchServe is still running")
        else:
            pid = server.pid()
            print(f"TorchServe running, pid {pid}, state in {server.state_dir}" if pid else "TorchServe not running")
            sys.exit(0 if pid else 3)
    except TorchServeError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
