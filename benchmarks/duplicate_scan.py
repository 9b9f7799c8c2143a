"""The near-duplicate scan at catalogue scale: a synthetic catalogue derived from real embeddings
(benchmarks.synthetic_catalogue) with planted groups of near-duplicates at distances under the threshold, published
with an index profile, then scanned by training.duplicates at one or more nprobe values. Reports the time, the
planted groups found whole and the other groups found (docs/duplicates.md)."""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from benchmarks import synthetic_catalogue as synthetic
from benchmarks.real_embeddings import embed
from training.duplicates import scan_catalogue
from visual_search.catalogue import open_catalogue, publish_catalogue
from visual_search.catalogue.vectors import SegmentWriter, l2_normalize
from visual_search.cli import HelpFormatter
from visual_search.fileio import write_atomically
from visual_search.items import Item, read_csv

USAGE = """examples:
  python -m benchmarks.duplicate_scan --size 1000000 --threshold 0.05 --nprobe 4 16 --threads 2
  python -m benchmarks.duplicate_scan --size 100000 --threshold 0.05 --profile exact
"""

GROUP_SIZES = (2, 2, 2, 2, 2, 2, 3, 3, 3, 4, 5, 8)  # copies per planted group, drawn uniformly from this list


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--size", type=int, default=1_000_000, help="listings in all, planted copies included")
    p.add_argument("--groups", type=int, default=2000, help="planted near-duplicate groups")
    p.add_argument("--threshold", type=float, required=True, help="squared L2 distance (the calibrated one)")
    p.add_argument("--profile", default="accurate")
    p.add_argument("--nprobe", type=int, nargs="+", default=[None], help="scans to run (default: the catalogue's)")
    p.add_argument("--neighbours", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="FAISS threads")
    p.add_argument("--bundle", default="runs/demo/bundle", help="the model that embeds the real photos")
    p.add_argument("--images", default="data/fashion-mnist/images")
    p.add_argument("--real-dir", default="results/index_scale/real", help="cache of the real embeddings")
    p.add_argument("--real-embeddings", default=None, help="real unit embeddings (.npy) to derive the rows from "
                                                           "instead, e.g. a bundle's embeddings.npy")
    p.add_argument("--real-items", default=None, help="their items CSV, in the same order")
    p.add_argument("--out", default="results/duplicate_scan")
    p.add_argument("--keep", action="store_true", help="keep the catalogue folder (its stored vectors and index)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def planted_rows(model, sources, threshold, rng):
    """Copies of the rows `sources` (unit vectors), each at a squared distance drawn uniformly from 5% to 90% of
    the threshold, along noise shaped like the real embeddings' spread."""
    noise = rng.standard_normal((len(sources), synthetic.PCA_DIMS), dtype=np.float32) @ model.basis
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    target = rng.uniform(0.05, 0.9, (len(sources), 1)) * threshold
    # |normalize(v + s n) - v|^2 = 2 - 2 / sqrt(1 + s^2) for unit v and a unit n orthogonal enough to v
    scale = np.sqrt(np.maximum((2 / (2 - target)) ** 2 - 1, 0))
    return l2_normalize(sources + scale.astype(np.float32) * noise)


def write_catalogue_rows(model, args, path, rng):
    """Writes the base rows and the planted copies after them; returns (items, planted groups as key lists)."""
    sizes = rng.choice(GROUP_SIZES, size=args.groups)
    base = args.size - int(sizes.sum())
    sources = np.sort(rng.choice(base, size=args.groups, replace=False))
    writer, items, kept = SegmentWriter(path, args.size), [], {}
    row = 0
    for origins, chunk in synthetic.rows(model, base, seed=args.seed + 1):
        writer.write(chunk)
        for key in sources[(sources >= row) & (sources < row + len(chunk))]:
            kept[int(key)] = chunk[key - row]
        items += [Item(synthetic.item_id(row + i), model.categories[o], f"{model.categories[o]}/x.png")
                  for i, o in enumerate(origins)]
        row += len(chunk)
    groups, key = [], base
    for source, size in zip(sources, sizes):
        copies = planted_rows(model, np.repeat(kept[int(source)][None, :], size, axis=0), args.threshold, rng)
        writer.write(copies)
        category = items[source].category
        items += [Item(f"d{key + i:08d}", category, f"{category}/x.png") for i in range(size)]
        groups.append([int(source), *range(key, key + size)])
        key += size
    writer.close()
    return items, groups


def judge(scan, planted):
    """How the scan's groups cover the planted ones: found whole (all members in one group), found exactly."""
    group_of = {key: g for g, group in enumerate(scan.groups) for key, _ in group}
    whole = exact = 0
    for members in planted:
        found = {group_of.get(key) for key in members}
        if len(found) == 1 and None not in found:
            whole += 1
            exact += len(scan.groups[found.pop()]) == len(members)
    planted_keys = {key for members in planted for key in members}
    other = [group for group in scan.groups if not any(key in planted_keys for key, _ in group)]
    return {"planted": len(planted), "found_whole": whole, "found_exactly": exact,
            "planted_pairs_recall": round(sum(len(m) - 1 for m in planted if len({group_of.get(k) for k in m}) == 1
                                              and group_of.get(m[0]) is not None)
                                          / sum(len(m) - 1 for m in planted), 4),
            "other_groups": len(other), "listings_in_other_groups": sum(len(g) for g in other)}


def main(argv=None):
    args = get_args(argv)
    faiss.omp_set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.real_embeddings:
        real_path, real_items = Path(args.real_embeddings), read_csv(args.real_items)
    else:
        try:
            real_path, real_items = embed(args.bundle, args.images, args.real_dir)
        except (OSError, ValueError) as error:
            sys.exit(f"error: real embeddings: {error}")
    model = synthetic.fit(l2_normalize(np.load(real_path, allow_pickle=False)), [it.category for it in real_items],
                          cache_dir=None if args.real_embeddings else args.real_dir)
    rng = np.random.default_rng(args.seed)
    work = out / f"n{args.size}-{args.profile}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started = time.perf_counter()
    items, planted = write_catalogue_rows(model, args, work / "embeddings.npy", rng)
    written = time.perf_counter() - started
    started = time.perf_counter()
    publish_catalogue(work / "catalogue", work / "embeddings.npy", items, categories=sorted(set(model.categories)),
                      profile=args.profile)
    published = time.perf_counter() - started
    (work / "embeddings.npy").unlink()
    del items
    results = {"size": args.size, "profile": args.profile, "real_rows": len(real_items),
               "median_nn_distance_of_real_rows": model.nn_distance, "threshold": args.threshold,
               "threads": args.threads,
               "cpus": os.cpu_count(), "load": os.getloadavg(), "write_seconds": round(written, 1),
               "publish_seconds": round(published, 1), "planted_listings": sum(len(g) for g in planted),
               "scans": []}
    for nprobe in args.nprobe:
        catalogue = open_catalogue(work / "catalogue")
        try:
            results["factory"] = catalogue.manifest["factory"]
            print(f"--- scan, nprobe {nprobe or catalogue.search_params.get('nprobe')}", flush=True)
            scan = scan_catalogue(catalogue, args.threshold, args.neighbours, nprobe)
        finally:
            catalogue.close()
        entry = {"nprobe": scan.nprobe, "neighbours": scan.neighbours, "seconds": scan.seconds,
                 "shortlist_margin": scan.margin, "pairs_checked": scan.checked, "pairs_within": scan.pairs,
                 "groups": len(scan.groups), "load": os.getloadavg(), **judge(scan, planted)}
        results["scans"].append(entry)
        print(json.dumps(entry), flush=True)
        write_atomically(out / f"n{args.size}-{args.profile}.json", json.dumps(results, indent=1) + "\n", replace=True)
    if not args.keep:
        shutil.rmtree(work / "catalogue")
    print(f"wrote {out / f'n{args.size}-{args.profile}.json'}")


if __name__ == "__main__":
    main()
