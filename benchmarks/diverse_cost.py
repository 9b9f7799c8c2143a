"""What the near-duplicate options cost at search time: plain similar items, diverse answers, a duplicates check and
both, on a catalogue folder, one query at a time and in batches, through the code the handler runs
(Catalogue.answer, then visual_search.catalogue.duplicates.finish). Reports ms per query, the neighbours searched
and how often a deeper search was needed (docs/duplicates.md)."""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

import faiss
import numpy as np

from visual_search.catalogue import SearchRequest, open_catalogue
from visual_search.catalogue.duplicates import Threshold, calibrated_threshold, finish, plan_of
from visual_search.cli import HelpFormatter
from visual_search.fileio import write_atomically

USAGE = """examples:
  python -m benchmarks.diverse_cost --catalogue runs/demo/bundle/catalogue --queries results/queries.npy
  python -m benchmarks.diverse_cost --catalogue results/real-70k --queries q.npy --threshold 0.05 --k 4 10
"""

MODES = {"plain": {}, "diverse": {"diverse": True}, "duplicates": {"duplicates": True},
         "both": {"diverse": True, "duplicates": True}}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--catalogue", required=True)
    p.add_argument("--queries", required=True, help=".npy of query vectors [n, 2048], unit length")
    p.add_argument("--threshold", type=float, default=None, help="one for every category (default: the catalogue's "
                                                                 "calibrated ones)")
    p.add_argument("--k", type=int, nargs="+", default=[4, 10])
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="FAISS threads (a worker's share)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    return p.parse_args(argv)


def run(catalogue, vectors, k, params, threshold):
    """(results, extras, first-search depths) of one batch through the handler's path."""
    plans = [plan_of({"k": k, **params}, threshold, catalogue.manifest) for _ in vectors]
    requests = [SearchRequest(k=plan.first_depth(), vector=v) for plan, v in zip(plans, vectors)]
    results, extras = finish(catalogue, requests, catalogue.answer(requests), plans)
    return results, extras


def measure(catalogue, queries, k, params, threshold, single, batch):
    times = []
    for vector in queries[:single]:
        started = time.perf_counter()
        run(catalogue, vector[None, :], k, params, threshold)
        times.append(time.perf_counter() - started)
    started, collapsed, found = time.perf_counter(), [], []
    for start in range(0, len(queries), batch):
        _, extras = run(catalogue, queries[start:start + batch], k, params, threshold)
        collapsed += [e["diverse"]["collapsed"] for e in extras if "diverse" in e]
        found += [len(e["duplicates"]["listings"]) for e in extras if "duplicates" in e]
    batched = (time.perf_counter() - started) / len(queries)
    return {"single_ms_median": round(1000 * statistics.median(times), 3),
            "single_ms_p90": round(1000 * float(np.quantile(times, 0.9)), 3),
            "batched_ms_per_query": round(1000 * batched, 3),
            "collapsed_mean": round(float(np.mean(collapsed)), 3) if collapsed else None,
            "queries_with_collapse": round(float(np.mean(np.array(collapsed) > 0)), 4) if collapsed else None,
            "duplicates_mean": round(float(np.mean(found)), 3) if found else None,
            "queries_with_duplicates": round(float(np.mean(np.array(found) > 0)), 4) if found else None}


def main(argv=None):
    args = get_args(argv)
    faiss.omp_set_num_threads(args.threads)
    queries = np.load(args.queries, allow_pickle=False).astype(np.float32)
    catalogue = open_catalogue(args.catalogue)
    try:
        record = catalogue.manifest.get("duplicates") or {}
        threshold = Threshold(args.threshold, False) if args.threshold is not None else \
            calibrated_threshold(catalogue.manifest, record.get("weights_sha256"))
        if threshold is None:
            raise SystemExit("error: the catalogue records no threshold: pass --threshold")
        run(catalogue, queries[:8], 4, {}, threshold)  # warm up the page cache and the index
        results = {"catalogue": str(catalogue.folder), "items": catalogue.count,
                   "factory": catalogue.manifest["factory"], "search": catalogue.manifest["search"],
                   "threshold": threshold.distance, "by_category": threshold.by_category,
                   "queries": len(queries), "threads": args.threads,
                   "load": os.getloadavg(), "k": {}}
        for k in args.k:
            results["k"][k] = {}
            for mode, params in MODES.items():
                entry = measure(catalogue, queries, k, params, threshold, args.single, args.batch)
                results["k"][k][mode] = entry
                print(f"k={k:3d} {mode:10s} {json.dumps(entry)}", flush=True)
    finally:
        catalogue.close()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(args.out, json.dumps(results, indent=1) + "\n", replace=True)
    return results


if __name__ == "__main__":
    main()
