"""One measured step of benchmarks.index_scale in its own process, so that its time and memory are its own: build,
search, hold (for PSS across processes) or precision; each prints one JSON object on its last line."""
import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from visual_search.catalogue.build import publish_catalogue, reindex_catalogue, update_catalogue
from visual_search.catalogue.store import open_catalogue
from visual_search.cli import HelpFormatter
from visual_search.items import read_csv


def memory():
    """This process's smaps_rollup figures, in bytes."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":").lower()] = int(parts[1]) * 1024
    return out


def peak_rss():
    """VmHWM: this process's own peak (ru_maxrss would carry over the parent's peak through fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="FAISS threads")
    sub = p.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build")
    build.add_argument("how", choices=["publish", "reindex", "update"])
    build.add_argument("--out", required=True)
    build.add_argument("--source", help="catalogue folder (reindex, update)")
    build.add_argument("--embeddings", help=".npy rows (publish; update: the added rows)")
    build.add_argument("--items", help="items CSV for those rows")
    build.add_argument("--categories", nargs="*", help="category names in code order (publish)")
    build.add_argument("--profile")
    build.add_argument("--remove", nargs="*", default=[], help="ids to remove (update)")
    search = sub.add_parser("search")
    search.add_argument("--catalogue", required=True)
    search.add_argument("--queries", required=True, help=".npy query rows")
    search.add_argument("--category", required=True, help="the category of the filtered queries")
    search.add_argument("--k", type=int, default=10)
    search.add_argument("--single", type=int, default=50, help="queries timed one at a time")
    search.add_argument("--batch", type=int, default=64)
    search.add_argument("--sweep", type=int, nargs="*", default=[], help="nprobe values for the recall/QPS curve")
    search.add_argument("--no-mmap", action="store_true")
    hold = sub.add_parser("hold")
    hold.add_argument("--catalogue", required=True)
    hold.add_argument("--queries", required=True)
    hold.add_argument("--ready", required=True)
    hold.add_argument("--release", required=True)
    precision = sub.add_parser("precision")
    precision.add_argument("--catalogue", required=True)
    precision.add_argument("--embeddings", required=True)
    precision.add_argument("--items", required=True)
    precision.add_argument("--queries", type=int, default=0, help="how many items to search by (0: all)")
    precision.add_argument("--recall-queries", type=int, default=500)
    precision.add_argument("--batch", type=int, default=256)
    return p.parse_args(argv)


def build(args):
    started = time.perf_counter()
    if args.how == "publish":
        manifest = publish_catalogue(args.out, args.embeddings, read_csv(args.items), categories=args.categories,
                                     profile=args.profile)
    elif args.how == "reindex":
        manifest = reindex_catalogue(args.source, args.out, profile=args.profile)
    else:
        items = read_csv(args.items) if args.items else []
        manifest = update_catalogue(args.source, args.out, add_items=items,
                                    add_embeddings=args.embeddings if items else None, remove_ids=args.remove)
    return {"seconds": time.perf_counter() - started, "peak_rss": peak_rss(), "steps": manifest.get("build_seconds"),
            "factory": manifest["factory"], "search": manifest["search"], "count": manifest["count"],
            "files": {name: record["bytes"] for name, record in manifest["files"].items()}}


def timed(function, repeat):
    started = time.perf_counter()
    for i in range(repeat):
        function(i)
    return time.perf_counter() - started


def run_queries(catalogue, queries, k, batch, category=None):
    categories = [category] if category else ()
    out = []
    for start in range(0, len(queries), batch):
        out += [[n.id for n in h.neighbours] for h in catalogue.search(queries[start:start + batch], k, categories)]
    return out


def search(args):
    queries = np.load(args.queries, allow_pickle=False)
    before = memory()
    started = time.perf_counter()
    catalogue = open_catalogue(args.catalogue, mmap=not args.no_mmap)
    result = {"open_seconds": time.perf_counter() - started, "memory_before_open": before,
              "memory_after_open": memory(), "count": catalogue.count}
    k, single, cat = args.k, min(args.single, len(queries)), args.category
    started = time.perf_counter()
    catalogue.search(queries[:1], k)
    result["first_query_seconds"] = time.perf_counter() - started  # cold: right after open
    run_queries(catalogue, queries, k, args.batch)  # warm-up, as a worker is after some traffic
    run_queries(catalogue, queries, k, args.batch, cat)
    result["single_seconds"] = timed(lambda i: catalogue.search(queries[i:i + 1], k), single) / single
    result["single_filtered_seconds"] = timed(lambda i: catalogue.search(queries[i:i + 1], k, [cat]), single) / single
    started = time.perf_counter()
    result["answers"] = run_queries(catalogue, queries, k, args.batch)
    result["batch_seconds"] = (time.perf_counter() - started) / len(queries)
    started = time.perf_counter()
    result["filtered_answers"] = run_queries(catalogue, queries, k, args.batch, cat)
    result["batch_filtered_seconds"] = (time.perf_counter() - started) / len(queries)
    result["memory_after_queries"] = memory()
    result["sweep"] = []
    if args.sweep and catalogue.ivf is not None:
        stored = dict(catalogue.search_params)
        for nprobe in args.sweep:
            catalogue.search_params["nprobe"] = nprobe
            catalogue.ivf.nprobe = min(nprobe, catalogue.ivf.nlist)
            seconds = timed(lambda i: catalogue.search(queries[i:i + 1], k), single) / single
            result["sweep"].append({"nprobe": nprobe, "single_seconds": seconds,
                                    "answers": run_queries(catalogue, queries, k, args.batch)})
        catalogue.search_params.update(stored)
    catalogue.close()
    return result


def hold(args):
    queries = np.load(args.queries, allow_pickle=False)
    catalogue = open_catalogue(args.catalogue)
    run_queries(catalogue, queries, 10, 64)
    Path(args.ready).write_text(json.dumps(memory()))
    while not Path(args.release).exists():
        time.sleep(0.2)
    catalogue.close()
    return {"held": True}


def precision(args):
    """Every item (or the first --queries) searched by its own vector, k = 5: its 4 nearest other items."""
    vectors = np.load(args.embeddings, mmap_mode="r", allow_pickle=False)
    items = read_csv(args.items)
    count = args.queries or len(items)
    catalogue = open_catalogue(args.catalogue)
    hits_by_category, total_by_category = {}, {}
    started = time.perf_counter()
    for start in range(0, count, args.batch):
        rows = np.array(vectors[start:min(start + args.batch, count)])
        for offset, hits in enumerate(catalogue.search(rows, 5)):
            item = items[start + offset]
            others = [n for n in hits.neighbours if n.id != item.id][:4]
            hits_by_category[item.category] = hits_by_category.get(item.category, 0) + sum(
                n.category == item.category for n in others)
            total_by_category[item.category] = total_by_category.get(item.category, 0) + 4
    seconds = time.perf_counter() - started
    rng = np.random.default_rng(1)
    chosen = np.sort(rng.choice(len(items), size=min(args.recall_queries, len(items)), replace=False))
    top10 = []
    for hits, row in zip(catalogue.search(np.array(vectors[chosen]), 11), chosen):
        top10.append([n.id for n in hits.neighbours if n.id != items[row].id][:10])
    catalogue.close()
    return {"precision_at_4": {c: hits_by_category[c] / total_by_category[c] for c in sorted(total_by_category)},
            "overall": sum(hits_by_category.values()) / sum(total_by_category.values()), "queries": count,
            "seconds": seconds, "recall_rows": chosen.tolist(), "top10": top10}


def main(argv=None):
    args = get_args(argv)
    faiss.omp_set_num_threads(args.threads)
    result = {"build": build, "search": search, "hold": hold, "precision": precision}[args.command](args)
    result["peak_rss"] = peak_rss()
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
