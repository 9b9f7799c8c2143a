"""Live listings under a steady search load, one run through a real TorchServe with 2 workers: how soon a change
is answered after its write returns (adds and removals), changes per second while serving, search latency and
throughput with 0, 10k and 100k unfolded changes against none, and the time to fold 100k changes."""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from benchmarks.serve_scale import MODEL, write_archive
from loadtests.photos import load_photos
from loadtests.steady_load import SteadyLoad
from serving.torchserve import ADDRESS_KEYS, TorchServe, free_port
from visual_search.catalogue import open_catalogue, read_manifest, update_catalogue
from visual_search.catalogue.changes import ChangeLog
from visual_search.catalogue.vectors import l2_normalize
from visual_search.cli import HelpFormatter
from visual_search.items import Item

USAGE = """examples:
  python -m benchmarks.live_changes --catalogue results/index_scale/n1000000/catalogue-accurate
  python -m benchmarks.live_changes --catalogue DIR --changes 200 --levels 0,10000,100000 --seconds 60
"""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--catalogue", required=True, help="a published catalogue folder")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--clients", type=int, default=2, help="the steady load's clients")
    p.add_argument("--changes", type=int, default=200, help="changes timed for visibility (half adds)")
    p.add_argument("--levels", default="0,10000,100000", help="unfolded changes for the search figures")
    p.add_argument("--seconds", type=float, default=60, help="the steady load at each level")
    p.add_argument("--image-size", type=int, default=32, help="the model's input (the search is measured)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ready-timeout", type=int, default=900)
    p.add_argument("--out", default="results/live_changes.json")
    return p.parse_args(argv)


class Changes:
    """Synthetic changes of the line: listings near stored vectors, added and removed through the real log."""

    def __init__(self, log, catalogue, weights, seed=0):
        self.log, self.catalogue, self.weights = log, catalogue, weights
        self.rng = np.random.default_rng(seed)
        self.added, self.number = [], 0
        self.in_base = lambda item_id: item_id in catalogue.items.keys_of([item_id])

    def vector(self):
        key = int(self.rng.integers(self.catalogue.count))
        near = self.catalogue.vectors.get([key])[0] + 0.05 * self.rng.standard_normal(2048).astype(np.float32)
        return l2_normalize(near[None, :])[0]

    def add(self):
        self.number += 1
        category = self.catalogue.categories[int(self.rng.integers(len(self.catalogue.categories)))]
        item = Item(f"live-{self.number:07d}", category, f"{category}/live-{self.number:07d}.png")
        seq = self.log.append_add(item, self.vector(), self.weights, self.in_base)
        self.added.append(item.id)
        return item.id, seq

    def remove(self):
        item_id = self.added.pop(int(self.rng.integers(len(self.added))))
        return item_id, self.log.append_remove(item_id, self.in_base)

    def bulk(self, count, removals=0.1):
        """`count` changes in transactions of 1,000: adds, and a share of removals of earlier adds."""
        done = 0
        while done < count:
            size = min(1000, count - done)
            removes = [self.added.pop() for _ in range(int(size * removals)) if len(self.added) > 1]
            adds = []
            for _ in range(size - len(removes)):
                self.number += 1
                category = self.catalogue.categories[int(self.rng.integers(len(self.catalogue.categories)))]
                adds.append((Item(f"live-{self.number:07d}", category, f"{category}/x.png"), self.vector()))
            self.log.append(removes, adds, self.weights, self.in_base)
            self.added += [item.id for item, _ in adds]
            done += size


def listing_status(server, item_id):
    response = requests.post(f"{server.urls['inference']}/predictions/{MODEL}", json={"listing": item_id, "k": 1},
                             headers=server.headers(), timeout=60)
    return response.status_code


def visibility(server, changes, count):
    """Seconds from each write's return to the first answer that reflects it, adds and removals apart."""
    seconds = {"add": [], "remove": []}
    for i in range(count):
        kind = "add" if i % 2 == 0 or not changes.added else "remove"
        item_id, _ = changes.add() if kind == "add" else changes.remove()
        wanted, start = (200 if kind == "add" else 404), time.perf_counter()
        while listing_status(server, item_id) != wanted:
            time.sleep(0.005)
        seconds[kind].append(time.perf_counter() - start)
    return {kind: {"count": len(s), "p50_s": percentile(s, 50), "p99_s": percentile(s, 99), "max_s": max(s)}
            for kind, s in seconds.items()}


def sustained(changes, seconds=10.0):
    """Changes per second one writer commits, each durable when it returns, while the load runs."""
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        changes.add() if done % 3 or not changes.added else changes.remove()
        done += 1
    return done / (time.perf_counter() - start)


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else None


def metric_histogram(server, name):
    text = requests.get(f"{server.urls['metrics']}/metrics", timeout=30).text
    buckets = []
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    return sorted(buckets)


def quantile(before, after, q):
    """The q-quantile of a histogram's new samples between two scrapes (the upper bound of its bucket)."""
    counts = [(le, b - a) for (le, b), (_, a) in zip(after, before)]
    total = counts[-1][1] if counts else 0
    for le, count in counts:
        if total and count >= q * total:
            return le
    return None


def level_figures(server, photos, seconds, clients, k):
    """Served req/s, p50/p99 of whole requests, and the handler's search-stage p50/p99 buckets, at one level."""
    before = metric_histogram(server, "VisualSearchSearchTime")
    load = SteadyLoad(f"{server.urls['inference']}/predictions/{MODEL}",
                      {**server.headers(), "Content-Type": "image/jpeg", "X-Top-K": str(k)}, photos[0],
                      clients=clients, max_seconds=seconds).start()
    times = []
    session = requests.Session()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        session.post(f"{server.urls['inference']}/predictions/{MODEL}", data=photos[len(times) % len(photos)],
                     headers={**server.headers(), "Content-Type": "image/jpeg", "X-Top-K": str(k)}, timeout=120)
        times.append(time.perf_counter() - t)
    results = load.stop()
    after = metric_histogram(server, "VisualSearchSearchTime")
    elapsed = time.perf_counter() - start
    return {"requests_per_s": (len(results) + len(times)) / elapsed, "failed": len(load.failures()),
            "p50_ms": 1000 * statistics.median(times), "p99_ms": 1000 * percentile(times, 99),
            "search_p50_ms_at_most": milliseconds(quantile(before, after, 0.5)),
            "search_p99_ms_at_most": milliseconds(quantile(before, after, 0.99))}


def milliseconds(seconds):
    """None when the server exports no such histogram (TorchServe's metrics mode is not prometheus)."""
    return None if seconds is None else 1000 * seconds


def wait_applied(server, seq, timeout=600):
    deadline = time.time() + timeout
    url = f"{server.urls['management']}/models/{MODEL}?customized=true"
    while time.time() < deadline:
        for _ in range(4):
            meta = requests.get(url, headers=server.headers("management"), timeout=120).json()[0]
            meta = meta["customizedMetadata"]
            meta = json.loads(meta) if isinstance(meta, str) else meta
            if meta["changes"]["applied"] >= seq:
                return meta
        time.sleep(1)
    raise TimeoutError(f"the workers did not apply change {seq} within {timeout} s")


def fold_seconds(folder, log, work):
    """The time to fold the whole log into a new catalogue folder (the core of --compact)."""
    last = {}
    for change in log.since(0):
        last[change.id] = change
    adds = [c for c in last.values() if c.op == "add"]
    vectors = np.lib.format.open_memmap(work / "adds.npy", mode="w+", dtype=np.float32, shape=(len(adds), 2048))
    for row, change in enumerate(adds):
        vectors[row] = change.vector
    vectors.flush()
    start = time.perf_counter()
    update_catalogue(folder, work / "folded", add_items=[c.item for c in adds], add_embeddings=work / "adds.npy",
                     remove_ids=[], changes_folded=log.last_seq(), progress=False)
    return {"changes": log.last_seq(), "adds": len(adds), "seconds": time.perf_counter() - start}


def main(argv=None):
    args = get_args(argv)
    folder = Path(args.catalogue).resolve()
    manifest = read_manifest(folder)
    photos = load_photos(count=16)
    levels = [int(n) for n in args.levels.split(",")]
    result = {"catalogue": str(folder), "items": manifest["count"], "factory": manifest["factory"],
              "workers": args.workers, "clients": args.clients, "image_size": args.image_size}
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        work = Path(tmp)
        write_archive(folder, manifest, work, argparse.Namespace(**{**vars(args), "touch": 0}))
        weights = json.loads((work / "bundle" / "manifest.json").read_text())["weights_sha256"]
        server = TorchServe(work / "ts", model_store=work / "store",
                            ports={api: free_port() for api in ADDRESS_KEYS})
        server.start([f"{MODEL}.mar"], timeout=args.ready_timeout)
        catalogue = open_catalogue(folder)
        log = ChangeLog(work / "store" / f"{MODEL}.changes.sqlite", write=True, line=MODEL)
        changes = Changes(log, catalogue, weights)
        try:
            result["levels"] = {}
            unfolded = 0
            for level in levels:
                changes.bulk(level - unfolded)
                unfolded = level
                wait_applied(server, log.last_seq())
                result["levels"][level] = level_figures(server, photos, args.seconds, args.clients, args.k)
                print(level, result["levels"][level], flush=True)
            load = SteadyLoad(f"{server.urls['inference']}/predictions/{MODEL}",
                              {**server.headers(), "Content-Type": "image/jpeg"}, photos[0], clients=args.clients,
                              max_seconds=900).start()
            try:
                result["visibility"] = visibility(server, changes, args.changes)
                result["changes_per_s"] = sustained(changes)
            finally:
                load.stop()
            result["failed_during_changes"] = len(load.failures())
            result["fold"] = fold_seconds(folder, log, work)
        finally:
            log.close()
            catalogue.close()
            server.stop()
    base = result["levels"][levels[0]]
    for level in levels:
        figures = result["levels"][level]
        figures["p99_over_none"] = figures["p99_ms"] / base["p99_ms"]
        figures["requests_per_s_over_none"] = figures["requests_per_s"] / base["requests_per_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
