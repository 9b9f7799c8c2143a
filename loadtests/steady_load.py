"""A steady stream of searches from a few clients during a rollout: every 5 s the requests, failures and answering
versions so far; exits 1 if any request failed. Loopback only, unless --allow-remote."""
import argparse
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from loadtests.photos import product_jpeg
from loadtests.target import add_target_arguments, refuse_remote
from serving.torchserve import TorchServe, TorchServeError
from visual_search.cli import HelpFormatter

USAGE = """examples:
  python -m loadtests.steady_load --model visual-search --clients 3 --seconds 300
"""

class SteadyLoad:
    """`clients` threads posting `body` back to back until stop() or `max_seconds`; each answer is recorded as
    (HTTP status or None, model_version or None, neighbour ids, text excerpt)."""

    def __init__(self, url, headers, body, clients=3, max_seconds=300, max_requests=100000, timeout=60):
        self.url, self.headers, self.body, self.timeout = url, headers, body, timeout
        self.deadline, self.max_requests = time.time() + max_seconds, max_requests
        self.results, self.lock, self.stopping = [], threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self):
        while not self.stopping.is_set() and time.time() < self.deadline and len(self.results) < self.max_requests:
            try:
                response = requests.post(self.url, data=self.body, headers=self.headers, timeout=self.timeout)
                answer = response.json() if response.status_code == 200 else {}
                outcome = (response.status_code, answer.get("model_version"),
                           {n["id"] for n in answer.get("neighbours", [])}, response.text[:200])
            except (requests.RequestException, ValueError) as error:
                outcome = (None, None, set(), repr(error))
            with self.lock:
                self.results.append(outcome)

    def start(self):
        for thread in self.threads:
            thread.start()
        return self

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=self.timeout + 5)
        return self.results

    def snapshot(self):
        with self.lock:
            return list(self.results)

    def wait_for(self, version, count=3, timeout=30):
        """Waits until `count` more answers, counted from now, came from `version`; False if they did not."""
        first, end = len(self.snapshot()), time.time() + timeout
        while time.time() < end:
            if sum(r[1] == version for r in self.snapshot()[first:]) >= count:
                return True
            time.sleep(0.1)
        return False

    def failures(self):
        return [r for r in self.snapshot() if r[0] != 200]

    def summary(self):
        results = self.snapshot()
        versions = Counter(r[1] for r in results if r[0] == 200)
        return (f"{len(results)} requests, {len(self.failures())} failed, answered by "
                f"{', '.join(f'{v}: {n}' for v, n in sorted(versions.items())) or 'none'}")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    add_target_arguments(p)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--photo", default=None, help="image to send (default: a synthetic JPEG)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    refuse_remote(args)
    try:
        key = TorchServe(args.state_dir).keys()["inference"]
    except (TorchServeError, KeyError) as error:
        sys.exit(f"error: no inference key in {args.state_dir}/key_file.json ({error})")
    body = Path(args.photo).read_bytes() if args.photo else product_jpeg(0, (64, 48))
    load = SteadyLoad(f"{args.host.rstrip('/')}/predictions/{args.model}", {"Authorization": f"Bearer {key}"},
                      body, args.clients, args.seconds).start()
    try:
        while any(t.is_alive() for t in load.threads):
            time.sleep(5)
            print(load.summary(), flush=True)
    except KeyboardInterrupt:
        pass
    load.stop()
    failures = load.failures()
    for status, _, _, text in failures[:5]:
        print(f"  failed: HTTP {status}: {text}")
    print(f"done: {load.summary()}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
