"""Test accuracy and retrieval precision@k of a bundle on held-out photos, written to a JSON file. A query that
gets fewer than k results counts each missing one as a miss (queries_short_of_k reports how many)."""
import argparse
import json
from pathlib import Path

import numpy as np

from training.distributed import pick_device
from training.embedding import embed_items
from visual_search.bundle import load_bundle
from visual_search.cli import HelpFormatter
from visual_search.items import read_csv, subsample
from visual_search.runtime import Runtime
from visual_search.runtime_settings import check_catalogue_runtime

USAGE = """examples:
  python -m training.evaluate --bundle runs/x/bundle --data-dir data/photos --queries runs/x/val.csv
"""

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle folder written by training.build_index")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--queries", required=True, help="CSV of held-out images (the run's val.csv)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-per-category", type=int, default=None, help="evaluate on a seeded subset")
    p.add_argument("--out", default=None, help="JSON file (default: evaluation.json in the bundle folder)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def retrieval_metrics(query_categories, neighbour_categories, k):
    """(precision@k overall, per category, number of queries that got fewer than k results) from [Q] query
    categories and, per query, the categories of the neighbours it got (at most k)."""
    hits = np.array([sum(c == q for c in found[:k]) for q, found in zip(query_categories, neighbour_categories)])
    per_query = hits / k
    per_category = {str(c): float(per_query[query_categories == c].mean()) for c in sorted(set(query_categories))}
    return float(per_query.mean()), per_category, sum(len(found) < k for found in neighbour_categories)


def main(argv=None):
    args = get_args(argv)
    bundle = load_bundle(args.bundle)
    queries = subsample(read_csv(args.queries), args.max_per_category, seed=1)
    settings, dropped = bundle.runtime.for_device(pick_device(args.device))  # the runtime the archive serves with
    for name, why in dropped.items():
        print(f"runtime setting {name} not applied: {why}")
    check_catalogue_runtime(bundle.catalogue.manifest, settings, where="the evaluation")
    runtime = Runtime(bundle, "cpu" if settings.engine == "openvino" else pick_device(args.device), settings)
    embeddings, probabilities = embed_items(runtime, args.data_dir, queries, bundle.categories, args.batch_size,
                                            args.workers, desc="embedding queries")
    catalogue = bundle.catalogue
    found = [[n.category for n in hits.neighbours] for start in range(0, len(embeddings), 1024)
             for hits in catalogue.search(embeddings[start:start + 1024], args.k)]
    query_categories = np.array([it.category for it in queries])
    precision, per_category, short = retrieval_metrics(query_categories, found, args.k)
    predicted = np.array(bundle.categories)[probabilities.argmax(axis=1)]
    results = {
        "queries": len(queries),
        "catalogue_items": catalogue.count,
        "index": {"profile": catalogue.manifest["profile"], "factory": catalogue.manifest["factory"],
                  "search": catalogue.manifest["search"]},
        "k": args.k,
        "test_accuracy": float((predicted == query_categories).mean()),
        f"precision_at_{args.k}": precision,
        f"precision_at_{args.k}_per_category": per_category,
        "queries_short_of_k": short,
        "image_size": bundle.preprocess.image_size,
        "runtime": runtime.settings.name,
    }
    out = Path(args.out) if args.out else Path(args.bundle) / "evaluation.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"test accuracy {results['test_accuracy']:.4f} | precision@{args.k} {precision:.4f} "
          f"({len(queries)} queries, {catalogue.count} catalogue items, runtime {runtime.settings.name}) -> {out}")
    if short:
        print(f"warning: {short} of {len(queries)} queries got fewer than {args.k} results from the "
              f"{catalogue.manifest['factory']} index; each missing one counted as a miss")
    return results


if __name__ == "__main__":
    main()
