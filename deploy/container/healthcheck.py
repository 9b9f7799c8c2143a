"""The image's health check and the pods' readiness check: /ping, then a READY worker for every model's default
version (TorchServe 0.12 answers /ping while the model still loads). Keys from the state folder, renewed when
refused; none when token authorization is off. Standard library only. Exit 0 when healthy, else 1 with a reason."""
import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

USAGE = """examples:
  python deploy/container/healthcheck.py                      # state in /var/lib/visual-search (the image's)
  python deploy/container/healthcheck.py --url http://127.0.0.1:8080
"""

DEFAULT_STATE = "/var/lib/visual-search"
DEFAULT_INFERENCE = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-dir", default=DEFAULT_STATE, help="serving.serve's state folder")
    p.add_argument("--url", default=None, help="inference address (default: from the state folder's config)")
    p.add_argument("--management-url", default=None,
                   help="management address (default: from the state folder's config, else 127.0.0.1:8081)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per HTTP call")
    return p.parse_args(argv)


def read_properties(path):
    props = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                props[key.strip()] = value.strip()
    return props


def local(address):
    """The address to call from inside the container: a wildcard bind (0.0.0.0) is reached on loopback."""
    parts = urlsplit(address.rstrip("/"))
    if parts.hostname in ("0.0.0.0", "::", "[::]"):
        parts = parts._replace(netloc=f"127.0.0.1:{parts.port}")
    return urlunsplit(parts)


def read_keys(key_file):
    """{"inference": key, "management": key, "API": key}, or {} when there is no key file."""
    try:
        data = json.loads(key_file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise SystemExit(f"unhealthy: cannot read {key_file}: {error}") from None
    return {name: entry["key"] for name, entry in data.items() if isinstance(entry, dict) and "key" in entry}


def get(url, key, timeout):
    """(status, body text) of a GET; status 0 when nothing answered."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as error:
        return 0, str(getattr(error, "reason", error))


def refused_token(status, body):
    return status in (400, 401) and "token" in body.lower()


class Server:
    """GETs with the right key, renewing a refused one once with the API key."""

    def __init__(self, state, management, timeout):
        self.key_file = state / "key_file.json"
        self.management = management
        self.timeout = timeout

    def get(self, url, kind):
        keys = read_keys(self.key_file)
        status, body = get(url, keys.get(kind), self.timeout)
        if refused_token(status, body) and keys.get("API"):
            renewed, answer = get(f"{self.management}/token?type={kind}", keys["API"], self.timeout)
            if renewed != 200:
                raise SystemExit(f"unhealthy: TorchServe refused the {kind} key and renewing it failed "
                                 f"(HTTP {renewed}: {answer.strip()[:200]})")
            status, body = get(url, read_keys(self.key_file).get(kind), self.timeout)
        if status == 0:
            raise SystemExit(f"unhealthy: nothing answers at {url} ({body})")
        return status, body


def json_of(status, body):
    try:
        return json.loads(body) if status == 200 else None
    except ValueError:
        return None


def not_ready(server):
    """The models whose default version has no READY worker, as "name version (worker states)"."""
    url = f"{server.management}/models?limit=1000"
    listing = json_of(*server.get(url, "management"))
    if not isinstance(listing, dict):
        raise SystemExit(f"unhealthy: {url} did not list the models")
    waiting = []
    for name in [m["modelName"] for m in listing.get("models", [])]:
        url = f"{server.management}/models/{name}"
        described = json_of(*server.get(url, "management"))
        if not described:
            waiting.append(f"{name} (not described)")
            continue
        states = [w.get("status") for w in described[0].get("workers", [])]
        if "READY" not in states:
            waiting.append(f"{name} {described[0].get('modelVersion')} ({', '.join(states) or 'no workers'})")
    return waiting


def main(argv=None):
    args = get_args(argv)
    state = Path(args.state_dir)
    props = read_properties(state / "config.properties")
    inference = local(args.url or props.get("inference_address", DEFAULT_INFERENCE))
    management = local(args.management_url or props.get("management_address", DEFAULT_MANAGEMENT))
    server = Server(state, management, args.timeout)

    status, body = server.get(f"{inference}/ping", "inference")
    ping = json_of(status, body)
    if not isinstance(ping, dict) or ping.get("status") != "Healthy":
        raise SystemExit(f"unhealthy: {inference}/ping answered HTTP {status}: {body.strip()[:200]}")
    waiting = not_ready(server)
    if waiting:
        raise SystemExit(f"unhealthy: /ping says Healthy, but no READY worker yet for {'; '.join(waiting)}")
    print(f"healthy: {inference}/ping answered {json.dumps(ping)}, every model has a READY worker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
