"""Model versions through TorchServe's management API: list, register, set-default, rollback, scale, unregister.
Keys and addresses come from the state folder (--state-dir); every failure prints one line and exits 1."""
import argparse
import sys

from serving.management_client import ManagementClient, ManagementError
from serving.torchserve import DEFAULT_STATE
from visual_search.cli import HelpFormatter

USAGE = """examples:
  python -m serving.manage list
  python -m serving.manage register visual-search-v2.mar --set-default
  python -m serving.manage set-default visual-search 2.0
  python -m serving.manage rollback visual-search
  python -m serving.manage scale visual-search 2.0 --workers 2
  python -m serving.manage unregister visual-search 2.0
"""

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--state-dir", default=str(DEFAULT_STATE), help="TorchServe's state folder (key_file.json)")
    p.add_argument("--key-file", default=None, help="TorchServe's key_file.json (default: in --state-dir)")
    p.add_argument("--management-url", default=None, help="default: management_address of the config")
    p.add_argument("--model-store", default=None, help="default: model_store of the config, else model_store/")
    p.add_argument("--timeout", type=int, default=300, help="seconds to wait for workers and answers")
    commands = p.add_subparsers(dest="command", required=True)

    c = commands.add_parser("list", help="models, their versions, the default and the workers")
    c.add_argument("name", nargs="?", help="one model (default: all)")
    c = commands.add_parser("register", help="register an archive from the model store as a new version")
    c.add_argument("archive", help="file name of a .mar in the model store")
    c.add_argument("--workers", type=int, default=1, help="initial workers")
    c.add_argument("--set-default", action="store_true", help="make it the default once its workers are ready")
    c = commands.add_parser("set-default", help="make a registered version the default")
    c.add_argument("name")
    c.add_argument("version")
    c = commands.add_parser("rollback", help="set the default back to the previous default")
    c.add_argument("name")
    c = commands.add_parser("scale", help="set the number of workers of a version")
    c.add_argument("name")
    c.add_argument("version", nargs="?", help="default: the default version")
    c.add_argument("--workers", type=int, required=True, help="minimum workers")
    c.add_argument("--max-workers", type=int, default=None, help="default: --workers")
    c.add_argument("--force", action="store_true", help="remove workers of the default version even though the "
                                                        "requests they are running fail (TorchServe 0.12)")
    c = commands.add_parser("unregister", help="unregister a version that is not the default")
    c.add_argument("name")
    c.add_argument("version")
    c.add_argument("--drain-seconds", type=float, default=2.0,
                   help="how long its queue must stay empty first (requests routed just before a switch)")
    return p.parse_args(argv)


def print_versions(client, names):
    rows = [("MODEL", "VERSION", "DEFAULT", "WORKERS", "ARCHIVE")]
    for name in names:
        for v in client.versions(name):
            ready = sum(w.get("status") == "READY" for w in v.get("workers", []))
            rows.append((name, v["modelVersion"], "*" if v["default"] else "",
                         f"{ready} ready ({v['minWorkers']}-{v['maxWorkers']})", v["modelUrl"]))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def run(args):
    client = ManagementClient.from_state(args.state_dir, key_file=args.key_file, url=args.management_url,
                                         model_store=args.model_store, timeout=args.timeout)
    if args.command == "list":
        names = [args.name] if args.name else client.model_names()
        if not names:
            print("no models registered")
        for name in names:
            client.default_version(name)  # a clear error for an unknown model before printing anything
        if names:
            print_versions(client, names)
    elif args.command == "register":
        name, version = client.register(args.archive, args.workers, args.set_default, args.timeout)
        state = "it is the default now" if args.set_default else \
            f"default stays {client.default_version(name)}; switch with: set-default {name} {version}"
        print(f"registered {name} {version} from {args.archive} with {args.workers} worker(s); {state}")
    elif args.command == "set-default":
        previous = client.set_default(args.name, args.version, args.timeout)
        print(f"{args.name}: default {previous} -> {args.version}")
    elif args.command == "rollback":
        current, target = client.rollback(args.name)
        print(f"{args.name}: rolled back, default {current} -> {target}")
    elif args.command == "scale":
        version = args.version or client.default_version(args.name)
        client.scale(args.name, version, args.workers, args.max_workers, args.force)
        print(f"{args.name} {version}: {client.ready_workers(args.name, version)} READY worker(s)")
    elif args.command == "unregister":
        client.unregister(args.name, args.version, args.drain_seconds)
        print(f"unregistered {args.name} {args.version}")


def main(argv=None):
    args = get_args(argv)
    try:
        run(args)
    except ManagementError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
