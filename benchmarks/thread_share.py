"""Threads per worker after `scale --workers 2`, one run: "fixed" (--threads <all cores>, as when threads came from
the archive's worker count) against "shared" (each worker its share of the live workers' CPUs); Locust req/s and p95
side by side."""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import requests

from benchmarks.benchmark import MODEL, build, locust_step
from loadtests.photos import load_photos
from serving.torchserve import TorchServe, free_port
from visual_search.cli import HelpFormatter

USAGE = """examples:
  python -m benchmarks.thread_share --image-size 225 --users 4,8 --step-time 40s --out results/thread_share
"""

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--image-size", type=int, default=225)
    p.add_argument("--catalogue-size", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-batch-delay", type=int, default=5, help="ms")
    p.add_argument("--users", default="4,8")
    p.add_argument("--step-time", default="40s")
    p.add_argument("--mix", default="similar=1.0")
    p.add_argument("--out", default="results/thread_share")
    return p.parse_args(argv)


def scaled_to_two(server, settle=15):
    """Scales the model to 2 workers and waits for both, then long enough for every worker's next thread check."""
    response = requests.put(f"{server.urls['management']}/models/{MODEL}", headers=server.headers("management"),
                            params={"min_worker": 2, "max_worker": 2, "synchronous": "true"}, timeout=300)
    response.raise_for_status()
    url = f"{server.urls['inference']}/predictions/{MODEL}"
    photo = load_photos(count=1)[0]
    deadline = time.time() + settle
    while time.time() < deadline:  # the checks run at batches
        requests.post(url, data=photo, headers={**server.headers(), "Content-Type": "image/jpeg"}, timeout=120)
        time.sleep(0.5)


def measure(args, archive, out, name):
    server = TorchServe(out / f"torchserve-{name}", model_store=archive.parent,
                        ports={api: free_port() for api in ("inference", "management", "metrics")})
    server.start([archive.name], timeout=600)
    try:
        scaled_to_two(server)
        return [locust_step(server, args, out / name, int(users)) for users in args.users.split(",")]
    finally:
        server.stop()


def main(argv=None):
    args = get_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos = load_photos(count=32)
    cores = len(os.sched_getaffinity(0))
    results = {}
    for name, runtime in (("fixed", ["--threads", str(cores)]), ("shared", [])):
        with tempfile.TemporaryDirectory() as tmp:
            options = argparse.Namespace(**{**vars(args), "workers": 1, "runtime": runtime,
                                            "code": str(Path(__file__).resolve().parent.parent)})
            archive = build(options, Path(tmp), photos)
            results[name] = measure(options, archive, out, name)
    print(f"2 workers after scale, {cores} cores, image size {args.image_size}, batch {args.batch_size}")
    print(f"{'users':>5}  {'fixed req/s':>11} {'p95 ms':>7}  {'shared req/s':>12} {'p95 ms':>7}  {'req/s ratio':>11}")
    for fixed, shared in zip(results["fixed"], results["shared"]):
        ratio = shared["requests_per_s"] / fixed["requests_per_s"] if fixed["requests_per_s"] else float("nan")
        print(f"{fixed['users']:>5}  {fixed['requests_per_s']:>11.2f} {fixed['p95_ms']:>7}  "
              f"{shared['requests_per_s']:>12.2f} {shared['p95_ms']:>7}  {ratio:>11.2f}")
    (out / "thread_share.json").write_text(json.dumps({"cores": cores, "settings": vars(args), **results}, indent=2))
    print(f"wrote {out / 'thread_share.json'}")


if __name__ == "__main__":
    main()
