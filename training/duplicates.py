"""Near-duplicate groups across a catalogue folder: one k-NN pass over its index with the stored vectors as queries,
in batches (the index's distances shortlist, exact distances from the stored vectors decide), union-find over the
pairs within the threshold (the lower of the two listings' categories' thresholds). Writes groups.csv (group, id,
distance to the group's first listing), summary.json and groups.png. docs/duplicates.md: thresholds and timings."""
import argparse
import csv
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from visual_search.catalogue import open_catalogue
from visual_search.catalogue.filters import codes_from_bitmaps, set_keys
from visual_search.catalogue.index import ivf_of, search_parameters
from visual_search.cli import HelpFormatter
from visual_search.errors import VisualSearchError
from visual_search.fileio import staging_folder, write_atomically

NEIGHBOURS = 16  # neighbours of each listing looked at; groups larger than this still join through their members
BATCH_ROWS = 4096
MARGIN_SAMPLE = 512  # listings whose shortlist distances are compared with exact ones, to set the shortlist margin
SHOWN_GROUPS = 12

USAGE = """examples:
  python -m training.duplicates catalogues/shop-v2 --out results/duplicates-shop-v2 --images data/photos
  python -m training.duplicates catalogues/shop-v2 --out results/dups --threshold 0.05 --nprobe 4
"""


class UnionFind:
    """Disjoint sets of keys; the root of a set is its smallest key (the listing published first)."""

    def __init__(self):
        self.parent = {}

    def find(self, key):
        parent = self.parent
        root = key
        while parent.get(root, root) != root:
            root = parent[root]
        while key != root:  # path compression
            key, parent[key] = parent[key], root
        return root

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def groups(self):
        """{root: sorted keys} of every set of two or more keys."""
        out = {}
        for key in list(self.parent):
            out.setdefault(self.find(key), [])
        for key in self.parent:
            out[self.find(key)].append(key)
        return {root: sorted({root, *keys}) for root, keys in out.items()}


@dataclass
class Scan:
    """The near-duplicate groups of a catalogue: [[(key, distance to the group's first key)]], largest first."""
    groups: list
    threshold: float  # for categories without their own
    items: int
    neighbours: int
    nprobe: int = None
    margin: float = 0.0
    pairs: int = 0  # pairs within the threshold
    checked: int = 0  # shortlisted pairs whose exact distance was computed
    seconds: dict = field(default_factory=dict)
    by_category: dict = field(default_factory=dict)


def shortlist_params(catalogue, nprobe):
    """SearchParameters for the pass: nprobe lists per query for IVF indexes (default the catalogue's own)."""
    if catalogue.ivf is None:
        return None, [], None
    nprobe = int(min(nprobe or catalogue.search_params.get("nprobe", 1), catalogue.ivf.nlist))
    params, keep = search_parameters(catalogue.index, None, nprobe=nprobe,
                                     quantizer_efSearch=catalogue.search_params.get("quantizer_efSearch"))
    return params, keep, nprobe


def shortlist_margin(catalogue, keys, neighbours, params, threshold, seed=0):
    """How far the index's distances can lie above the exact ones near the threshold, measured on a sample of
    listings searched by their stored vectors: the largest excess among pairs within twice the threshold. Exact
    codes (Flat) have none."""
    if catalogue.exact_codes:
        return 0.0
    sample = np.sort(np.random.default_rng(seed).choice(keys, size=min(len(keys), MARGIN_SAMPLE), replace=False))
    vectors = catalogue.vectors.get(sample)
    approx, found = catalogue.index.search(vectors, neighbours + 1, params=params)
    excess = []
    for row, (d_row, k_row) in enumerate(zip(approx, found)):
        valid = k_row >= 0
        exact = ((catalogue.vectors.get(k_row[valid]) - vectors[row]) ** 2).sum(axis=1)
        near = exact <= 2 * threshold
        excess.extend((d_row[valid][near] - exact[near]).tolist())
    return float(max(0.0, max(excess, default=0.0)))


def key_limits(catalogue, threshold, by_category):
    """float32 per key: the threshold of the key's category (its own, else `threshold`; -1 for none)."""
    per_code = np.array([by_category.get(name, threshold) for name in catalogue.categories], dtype=object)
    per_code = np.array([-1.0 if value is None else float(value) for value in per_code], dtype=np.float32)
    codes = codes_from_bitmaps(catalogue.bitmaps, catalogue.manifest["key_space"])
    return np.where(codes >= 0, per_code[np.maximum(codes, 0)], -1.0).astype(np.float32)


def scan_catalogue(catalogue, threshold, neighbours=NEIGHBOURS, nprobe=None, batch_rows=BATCH_ROWS, progress=True,
                   by_category=None):
    """The Scan of an open catalogue: every listing's `neighbours` nearest through the index, batched; pairs whose
    index distance is within the largest threshold plus the shortlist margin get their exact distance; union-find
    joins the pairs within the lower threshold of their two listings' categories (`by_category`, else
    `threshold`)."""
    started = time.perf_counter()
    by_category = dict(by_category or {})
    keys = set_keys(catalogue.alive())
    limits = key_limits(catalogue, threshold, by_category)
    widest = float(limits.max(initial=-1.0))
    params, keep, nprobe = shortlist_params(catalogue, nprobe)
    margin = shortlist_margin(catalogue, keys, neighbours, params, max(widest, 0.0))
    loose = widest + 2 * margin
    sets, pairs, checked, searching = UnionFind(), 0, 0, 0.0
    with tqdm(total=len(keys), desc="near-duplicate scan", unit="rows", unit_scale=True, disable=not progress) as bar:
        for part, vectors in catalogue.vectors.iter_keys(keys, batch_rows):
            begun = time.perf_counter()
            approx, found = catalogue.index.search(vectors, neighbours + 1, params=params)
            searching += time.perf_counter() - begun
            rows, columns = np.nonzero((found >= 0) & (found != part[:, None]) & (approx <= loose))
            if len(rows):
                a, b = part[rows], found[rows, columns]
                pair_keys = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1), axis=0)
                exact = exact_distances(catalogue, pair_keys, part, vectors)
                checked += len(pair_keys)
                within = exact <= np.minimum(limits[pair_keys[:, 0]], limits[pair_keys[:, 1]])
                for x, y in pair_keys[within]:
                    sets.union(int(x), int(y))
                    pairs += 1
            bar.update(len(part))
    del keep
    begun = time.perf_counter()
    groups = []
    for members in sets.groups().values():
        members = np.array(members, dtype=np.int64)
        vectors = catalogue.vectors.get(members)
        distances = ((vectors - vectors[0]) ** 2).sum(axis=1)
        groups.append([(int(k), float(d)) for k, d in zip(members, distances)])
    groups.sort(key=lambda group: (-len(group), group[0][0]))
    seconds = {"search": searching, "groups": time.perf_counter() - begun, "total": time.perf_counter() - started}
    return Scan(groups, threshold, len(keys), neighbours, nprobe, margin, pairs, checked,
                {name: round(value, 2) for name, value in seconds.items()}, by_category)


def exact_distances(catalogue, pair_keys, part, vectors):
    """Exact squared L2 distances of key pairs; rows of the batch in hand are not read again."""
    position = {int(key): row for row, key in enumerate(part)}
    others = sorted({int(k) for k in pair_keys.ravel()} - set(position))
    fetched = dict(zip(others, catalogue.vectors.get(others))) if others else {}

    def vector(key):
        key = int(key)
        return vectors[position[key]] if key in position else fetched[key]
    left = np.stack([vector(k) for k in pair_keys[:, 0]])
    right = np.stack([vector(k) for k in pair_keys[:, 1]])
    return ((left - right) ** 2).sum(axis=1)


def groups_csv(catalogue, scan):
    """groups.csv as text: group (1 = the largest), id, distance to the group's first listing (0 for the first)."""
    rows = catalogue.items.rows_of([key for group in scan.groups for key, _ in group])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("group", "id", "distance"))
    for number, group in enumerate(scan.groups, 1):
        for key, distance in group:
            writer.writerow((number, rows[key][0], f"{distance:.6f}"))
    return out.getvalue()


def summary(catalogue, scan, source):
    sizes = [len(group) for group in scan.groups]
    return {"catalogue": str(catalogue.folder), "catalogue_uid": catalogue.uid, "items": scan.items,
            "threshold": scan.threshold, "by_category": scan.by_category, "threshold_from": source,
            "neighbours": scan.neighbours,
            "nprobe": scan.nprobe, "shortlist_margin": round(scan.margin, 6), "pairs_within": scan.pairs,
            "pairs_checked": scan.checked, "groups": len(sizes), "listings_in_groups": sum(sizes),
            "largest_groups": sizes[:10], "seconds": scan.seconds, "faiss_threads": faiss.omp_get_max_threads()}


def threshold_of(catalogue, given):
    """(threshold, {category: threshold}, where they came from): --threshold for every category, else the ones
    calibrated with the catalogue."""
    if given is not None:
        return float(given), {}, "--threshold"
    record = catalogue.manifest.get("duplicates") or {}
    if record.get("threshold") is None and not any(v is not None for v in (record.get("by_category") or {}).values()):
        raise VisualSearchError(f"{catalogue.folder} records no calibrated near-duplicate threshold: pass --threshold")
    return record.get("threshold"), dict(record.get("by_category") or {}), "calibrated"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("catalogue", help="catalogue folder")
    p.add_argument("--out", required=True, help="new folder: groups.csv, summary.json, groups.png")
    p.add_argument("--threshold", type=float, default=None, help="squared L2 distance (default: the calibrated one)")
    p.add_argument("--neighbours", type=int, default=NEIGHBOURS, help="neighbours looked at per listing")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists per listing (default: the catalogue's)")
    p.add_argument("--batch-rows", type=int, default=BATCH_ROWS)
    p.add_argument("--images", default=None, help="catalogue image folder: draws groups.png when given")
    p.add_argument("--groups", type=int, default=SHOWN_GROUPS, help="groups in the picture")
    p.add_argument("--threads", type=int, default=None, help="FAISS threads (default: all cores)")
    return p.parse_args(argv)


def run(args):
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out} exists: a scan's folder is written once; choose a new --out")
    catalogue = open_catalogue(args.catalogue)
    try:
        threshold, by_category, source = threshold_of(catalogue, args.threshold)
        ivf = ivf_of(catalogue.index)
        print(f"scanning {catalogue.count} listings of {catalogue.folder} ({catalogue.manifest['factory']}"
              f"{f', {ivf.nlist} lists' if ivf is not None else ''}) for pairs within {by_category or threshold} "
              f"({source}{f'; {threshold} for the other categories' if by_category else ''})", flush=True)
        scan = scan_catalogue(catalogue, threshold, args.neighbours, args.nprobe, args.batch_rows,
                              by_category=by_category)
        report = summary(catalogue, scan, source)
        with staging_folder(out) as tmp:
            write_atomically(tmp / "groups.csv", groups_csv(catalogue, scan))
            write_atomically(tmp / "summary.json", json.dumps(report, indent=1) + "\n")
            if args.images and scan.groups:
                from training.plot import draw_groups  # noqa: PLC0415 (matplotlib only for the picture)

                shown = scan.groups[:args.groups]
                rows = catalogue.items.rows_of([key for group in shown for key, _ in group])
                draw_groups([[(rows[key][0], rows[key][2], d) for key, d in group] for group in shown], args.images,
                            tmp / "groups.png", title=f"{len(scan.groups)} near-duplicate groups in {catalogue.count} "
                                                      f"listings ({source} thresholds); the {len(shown)} largest")
    finally:
        catalogue.close()
    print(f"{report['groups']} groups, {report['listings_in_groups']} listings in groups (largest: "
          f"{report['largest_groups'][:5]}) in {scan.seconds['total']} s -> {out}")
    return report


def main(argv=None):
    try:
        return run(get_args(argv))
    except (VisualSearchError, ValueError, FileNotFoundError, FileExistsError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
