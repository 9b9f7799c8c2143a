"""The TorchServe a load tool sends to: --host, --state-dir (its key file), --model, and loopback only unless
--allow-remote says otherwise."""
import sys
from urllib.parse import urlparse

from serving.torchserve import DEFAULT_STATE

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def add_target_arguments(parser):
    """--host, --state-dir, --model, --allow-remote."""
    parser.add_argument("--host", default="http://127.0.0.1:8080", help="TorchServe inference address")
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE), help="folder with key_file.json")
    parser.add_argument("--model", default="visual-search")
    parser.add_argument("--allow-remote", action="store_true", help="allow a host that is not loopback")


def refuse_remote(args):
    """Load goes to loopback only, unless --allow-remote says otherwise."""
    if urlparse(args.host).hostname not in LOOPBACK and not args.allow_remote:
        sys.exit(f"error: {args.host} is not a loopback address; pass --allow-remote to load it deliberately")
