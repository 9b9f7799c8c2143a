"""A catalogue folder served from outside the archive by a real TorchServe: worker load time, memory per worker (RSS
and PSS, and of the mapped catalogue files) and the latency of a photo, a listing and a filtered search, one at a
time. See docs/large-catalogues.md."""
import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import requests
from tqdm import tqdm

from loadtests.photos import load_photos
from serving.build_archive import main as build_archive
from serving.management_client import ManagementClient, ManagementError
from serving.torchserve import ADDRESS_KEYS, TorchServe, TorchServeError, free_port
from tests.harness import CATEGORIES, calibrated_model
from training.publish import write_bundle
from visual_search.catalogue.items_db import ItemStore
from visual_search.catalogue.manifest import INDEX_FILE, ITEMS_FILE, read_manifest
from visual_search.cli import HelpFormatter
from visual_search.errors import CatalogueError
from visual_search.fileio import utc_now
from visual_search.preprocessing import PreprocessSettings

USAGE = """examples:
  python -m benchmarks.serve_scale --catalogue results/index_scale/n1000000/catalogue-accurate
  python -m benchmarks.serve_scale --catalogue catalogues/shop-v3 --workers 2 --queries 50 --out results/x.json
"""

MODEL = "serve-scale"
LOG_LINE = re.compile(r"^(\S+) \[\w+\s*\] (W-\d+-[^ ]+?)-stdout MODEL_LOG - (.*)$")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--catalogue", required=True, help="a published catalogue folder (visual_search.catalogue_cli)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--queries", type=int, default=30, help="timed requests of each kind")
    p.add_argument("--warmup", type=int, default=5, help="untimed requests of each kind first")
    p.add_argument("--touch", type=int, default=1000,
                   help="untimed listing searches before the last memory reading, so that each worker has mapped in "
                        "most of the index (0: none)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--category", default=None, help="the filter of the filtered queries (default: the largest)")
    p.add_argument("--image-size", type=int, default=32, help="the tiny model's input size")
    p.add_argument("--ready-timeout", type=int, default=600, help="s for the workers to become READY")
    p.add_argument("--out", default=None, help="JSON file (default: results/serve_scale/<catalogue name>.json)")
    p.add_argument("--work-dir", default=None, help="bundle, archive and TorchServe state (default: a temporary "
                                                    "folder, removed at the end)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- setting up

def write_archive(folder, manifest, work, args):
    """A bundle naming `folder` from outside, packed into work/store/MODEL.mar with --catalogue-dir."""
    preprocess = PreprocessSettings(image_size=args.image_size)
    model = calibrated_model(preprocess, load_photos(count=16, size=(160, 120)))
    write_bundle(work / "bundle", model=model, categories=CATEGORIES, preprocess=preprocess, catalogue_dir=folder,
                 normalize=manifest["normalized"], notes="benchmarks.serve_scale")
    build_archive(["--bundle", str(work / "bundle"), "--name", MODEL, "--version", "1.0", "--model-store",
                   str(work / "store"), "--workers", str(args.workers), "--batch-size", "1", "--max-batch-delay", "1",
                   "--startup-timeout", str(args.ready_timeout), "--max-k", str(max(100, args.k)),
                   "--catalogue-dir", str(folder)])


def register(server, workers, timeout):
    """Registers the archive without waiting; returns {worker id: seconds from the call to READY}."""
    client = ManagementClient.from_state(server.state_dir, timeout=120)
    start = time.perf_counter()
    client.call("POST", "/models", {"url": f"{MODEL}.mar", "initial_workers": workers, "synchronous": "false"})
    ready = {}
    while len(ready) < workers:
        if time.perf_counter() - start > timeout:
            sys.exit(f"error: {len(ready)} of {workers} workers READY after {timeout}s:\n{server.log_tail()}")
        try:
            described = client.describe(MODEL, "1.0").get("workers", [])
        except ManagementError:
            described = []
        for worker in described:
            if worker.get("status") == "READY" and worker["id"] not in ready:
                ready[worker["id"]] = round(time.perf_counter() - start, 2)
        time.sleep(0.2)
    return ready


# ---------------------------------------------------------------------------------------------- the log

def log_time(stamp):
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S,%f").timestamp()


def worker_log(server):
    """{worker id (9000, ...): {"pid", "load_s", "line"}} from the workers' lines in model_log.log: load_s is
    from the frontend's load request reaching the worker to the handler's "loaded ..." line."""
    workers = {}
    for line in (server.state_dir / "logs" / "model_log.log").read_text(errors="replace").splitlines():
        match = LOG_LINE.match(line)
        if not match or f"-{MODEL}_" not in match.group(2):
            continue
        stamp, thread, message = match.groups()
        entry = workers.setdefault(thread.split("-")[1], {})
        if message.startswith("[PID]"):
            entry["pid"] = int(message[5:])
        elif message.startswith("model_name:"):
            entry["load_request"] = log_time(stamp)
        elif message.startswith(f"loaded {MODEL} "):
            entry["line"] = message
            if "load_request" in entry:
                entry["load_s"] = round(log_time(stamp) - entry["load_request"], 2)
    for entry in workers.values():
        entry.pop("load_request", None)
    return workers


# ---------------------------------------------------------------------------------------------- memory

def children(pid):
    """PIDs whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def kib_fields(text, names):
    values = dict.fromkeys(names, 0)
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in values:
            values[name] += int(rest.split()[0])
    return values


def process_memory(pid, folder):
    """MB of RSS, PSS (and their anonymous / file parts) from smaps_rollup, and of each of the catalogue's mapped
    files (the index; items.sqlite, which SQLite maps) from smaps."""
    rollup = kib_fields(Path(f"/proc/{pid}/smaps_rollup").read_text(), ("Rss", "Pss", "Pss_Anon", "Pss_File"))
    files, current = {}, None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", fields[0]):
            path = Path(fields[5]) if len(fields) >= 6 else None
            current = files.setdefault(path.name, {"Rss": 0, "Pss": 0}) if path and path.parent == folder else None
        elif current is not None and fields[0] in ("Rss:", "Pss:"):
            current[fields[0][:-1]] += int(fields[1])
    mb = lambda kib: round(kib / 1024, 1)  # noqa: E731
    return {"rss_mb": mb(rollup["Rss"]), "pss_mb": mb(rollup["Pss"]), "pss_anon_mb": mb(rollup["Pss_Anon"]),
            "pss_file_mb": mb(rollup["Pss_File"]),
            "catalogue_files": {name: {"rss_mb": mb(v["Rss"]), "pss_mb": mb(v["Pss"])} for name, v in files.items()}}


def worker_memory(server, workers, folder):
    """{pid: memory} of the frontend's worker processes (its children), checked against the management API."""
    frontend = server.pid()
    pids = children(frontend)
    expected = sorted(int(w["pid"]) for w in workers)
    if pids != expected:
        sys.exit(f"error: the java frontend {frontend} has children {pids}, the management API names workers "
                 f"{expected}")
    return {pid: process_memory(pid, folder) for pid in pids}


# ---------------------------------------------------------------------------------------------- queries

def listing_ids(folder, manifest, count, seed=0):
    """Ids of `count` items spread over the catalogue."""
    items = ItemStore(folder / ITEMS_FILE)
    try:
        keys = np.random.default_rng(seed).choice(manifest["key_space"], size=min(4 * count, manifest["key_space"]),
                                                  replace=False)
        rows = items.rows_of(keys.tolist())
    finally:
        items.close()
    return [rows[int(k)][0] for k in keys if int(k) in rows][:count]


def send(session, server, body, headers, k):
    """ms of one request; exits on any answer that is not k neighbours."""
    start = time.perf_counter()
    response = session.post(f"{server.urls['inference']}/predictions/{MODEL}", data=body,
                            headers={**server.headers(), **headers}, timeout=120)
    elapsed = (time.perf_counter() - start) * 1000
    if response.status_code != 200 or len(response.json().get("neighbours", [])) != k:
        sys.exit(f"error: {headers} answered {response.status_code}: {response.text[:500]}")
    return elapsed


def summary(times):
    return {"median_ms": round(statistics.median(times), 1), "p90_ms": round(float(np.percentile(times, 90)), 1),
            "mean_ms": round(statistics.fmean(times), 1), "requests": len(times)}


def latencies(server, folder, manifest, args):
    """{kind: latency summary} of sequential requests of each kind, after `--warmup` of each."""
    category = args.category or manifest["categories"][int(np.argmax(manifest["category_counts"]))]
    photos = load_photos(count=args.queries)
    jpeg = {"Content-Type": "image/jpeg", "X-Top-K": str(args.k)}
    listings = listing_ids(folder, manifest, args.queries)
    kinds = {"photo": [(p, jpeg) for p in photos],
             "listing": [(None, {"X-Listing": i, "X-Top-K": str(args.k)}) for i in listings],
             f"photo, category {category}": [(p, {**jpeg, "X-Category": category}) for p in photos]}
    with requests.Session() as session:
        for asks in kinds.values():
            for i in range(args.warmup):
                send(session, server, *asks[i % len(asks)], args.k)
        return category, {kind: summary([send(session, server, *ask, args.k) for ask in asks])
                          for kind, asks in kinds.items()}


def touch(server, folder, manifest, args):
    """`--touch` listing searches, two at a time, untimed: each worker then has most of the index lists mapped in,
    so that its PSS shows its share of the whole index, not of the few lists that the timed queries visited."""
    if not args.touch:
        return
    listings = listing_ids(folder, manifest, args.touch, seed=1)
    with requests.Session() as session, ThreadPoolExecutor(2) as pool:
        list(tqdm(pool.map(lambda i: send(session, server, None, {"X-Listing": i, "X-Top-K": str(args.k)}, args.k),
                           listings), total=len(listings), desc="touching the index", unit="requests", mininterval=2))


# ---------------------------------------------------------------------------------------------- report

def print_table(result):
    print(f"\n{result['catalogue']}: {result['items']:,} items, {result['factory']} {result['search']}, "
          f"index {result['index_mb']:,.0f} MB, {result['workers']} workers")
    print("\n| worker pid | register -> READY (s) | handler load (s) | RSS after load (MB) | PSS after load (MB) | "
          "RSS after queries (MB) | PSS after queries (MB) | PSS anon / file (MB) | index.faiss mapped: RSS / PSS "
          "(MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for worker in result["per_worker"]:
        load, after = worker["memory_after_load"], worker["memory_after_queries"]
        index = after["catalogue_files"].get(INDEX_FILE, {"rss_mb": 0, "pss_mb": 0})
        print(f"| {worker['pid']} | {worker['ready_s']} | {worker.get('load_s')} | {load['rss_mb']:,.0f} | "
              f"{load['pss_mb']:,.0f} | {after['rss_mb']:,.0f} | {after['pss_mb']:,.0f} | "
              f"{after['pss_anon_mb']:,.0f} / {after['pss_file_mb']:,.0f} | "
              f"{index['rss_mb']:,.0f} / {index['pss_mb']:,.0f} |")
    print(f"\nsum over the workers after queries: RSS {result['rss_sum_mb']:,.0f} MB, "
          f"PSS {result['pss_sum_mb']:,.0f} MB")
    print("\n| request (one at a time) | median ms | p90 ms | mean ms |\n|---|---|---|---|")
    for kind, figures in result["latency"].items():
        print(f"| {kind} | {figures['median_ms']} | {figures['p90_ms']} | {figures['mean_ms']} |")
    for worker in result["per_worker"]:
        print(f"\nworker {worker['pid']} log: {worker.get('line')}")


def measure(folder, manifest, work, args):
    write_archive(folder, manifest, work, args)
    server = TorchServe(work / "torchserve", model_store=work / "store", ports={a: free_port() for a in ADDRESS_KEYS})
    server.start(timeout=120)
    try:
        ready = register(server, args.workers, args.ready_timeout)
        described = ManagementClient.from_state(server.state_dir).describe(MODEL, "1.0")["workers"]
        after_load = worker_memory(server, described, folder)
        category, latency = latencies(server, folder, manifest, args)
        touch(server, folder, manifest, args)
        after_queries = worker_memory(server, described, folder)
        logged = worker_log(server)
    finally:
        server.stop()
    per_worker = []
    for worker in described:
        pid = int(worker["pid"])
        entry = logged.get(str(worker["id"]), {})
        per_worker.append({"worker": worker["id"], "pid": pid, "ready_s": ready[worker["id"]],
                           "load_s": entry.get("load_s"), "line": entry.get("line"),
                           "memory_after_load": after_load[pid], "memory_after_queries": after_queries[pid]})
    return {"catalogue": str(folder), "items": manifest["count"], "factory": manifest["factory"],
            "search": manifest["search"], "index_mb": round(manifest["files"][INDEX_FILE]["bytes"] / 2 ** 20, 1),
            "workers": args.workers, "k": args.k, "touch_requests": args.touch, "filter_category": category,
            "per_worker": per_worker,
            "latency": latency, "pss_sum_mb": round(sum(w["memory_after_queries"]["pss_mb"] for w in per_worker), 1),
            "rss_sum_mb": round(sum(w["memory_after_queries"]["rss_mb"] for w in per_worker), 1),
            "measured": utc_now()}


def main(argv=None):
    args = get_args(argv)
    folder = Path(args.catalogue).resolve()
    try:
        manifest = read_manifest(folder)
    except CatalogueError as error:
        sys.exit(f"error: {error}")
    out = Path(args.out or f"results/serve_scale/{folder.name}.json")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="serve_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = measure(folder, manifest, work, args)
    except (TorchServeError, ManagementError) as error:
        sys.exit(f"error: {error}")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print_table(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
