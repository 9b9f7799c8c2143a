"""Calibrates the near-duplicate thresholds of a model and catalogue on held-out photos: altered copies of each
listing's photo are the positives; a different listing of the same category and each copy's nearest non-copy
listings the negatives. Precision and recall against the threshold, per category of the listing and per alteration,
and the operating points that publish records in the catalogue manifest. Run alone: JSON, tables and the plot."""
import argparse
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.alterations import ALTERATIONS, altered_copies
from visual_search.bundle import load_bundle
from visual_search.catalogue.vectors import RowReader, l2_normalize
from visual_search.cli import HelpFormatter
from visual_search.errors import InputError
from visual_search.fileio import staging_folder, utc_now, write_atomically
from visual_search.images import decode_image
from visual_search.items import read_csv, subsample
from visual_search.model import TrainedModel
from visual_search.runtime import Runtime

TARGET_PRECISION = 0.99
NEAREST_NEGATIVES = 10  # each copy's nearest listings that are not its own: what a duplicates answer could wrongly name
SPARE = 5  # further neighbours kept, to refill after leaving out listings with a pixel-identical photo
MIN_COPIES = 50  # copies of a category's listings needed for a threshold of its own (else the catalogue-wide one)
DEFAULT_LISTINGS = 500
CHUNK_ROWS = 4096

USAGE = """examples:
  python -m training.calibration --bundle runs/demo/bundle --data-dir data/fashion-mnist/images \\
      --photos runs/demo/val.csv --out results/duplicates-calibration
"""


@dataclass
class LabelledSet:
    """Labelled pairs (an altered copy, a listing): distance, whether the listing is the copy's own, the copy's
    alteration, the kind of pair ("copy", "same-category" or "nearest") and the listing's category."""
    distances: np.ndarray
    positive: np.ndarray
    alteration: np.ndarray
    kind: np.ndarray
    category: np.ndarray
    listings: int
    identical_left_out: int  # listings whose photo is pixel for pixel the held-out listing's: duplicates already


class Reference:
    """The listings a copy's nearest non-copy neighbours are searched among, by chunks of (ids, unit vectors), and
    the image of an id under `root` (for the pixel-identical check; None: the held-out photos' folder)."""

    def __init__(self, chunks, images, categories, root=None):
        self.chunks, self.images, self.categories, self.root = chunks, images, categories, root

    @classmethod
    def from_embeddings(cls, embeddings, items, normalize=True, root=None):
        """Embeddings (a .npy path or an array, rows in `items` order) not yet published."""
        items = list(items)

        def chunks():
            reader = RowReader(embeddings)
            try:
                for start in range(0, len(reader), CHUNK_ROWS):
                    rows = reader.rows(start, min(start + CHUNK_ROWS, len(reader)))
                    yield [it.id for it in items[start:start + len(rows)]], l2_normalize(rows) if normalize else rows
            finally:
                reader.close()
        return cls(chunks, {it.id: it.image for it in items}, {it.id: it.category for it in items}, root)

    @classmethod
    def from_catalogue(cls, catalogue, root=None):
        """A published catalogue's stored vectors."""
        rows = {key: (item_id, catalogue.categories[code], image)
                for key, item_id, code, image in catalogue.items.iter_rows()}

        def chunks():
            for keys, vectors in catalogue.vectors.iter_keys(np.fromiter(rows, dtype=np.int64), CHUNK_ROWS):
                yield [rows[int(key)][0] for key in keys], vectors
        return cls(chunks, {item_id: image for item_id, _, image in rows.values()},
                   {item_id: category for item_id, category, _ in rows.values()}, root)


@torch.inference_mode()
def embed_uploads(runtime, uploads, batch_size=64):
    """float32 [len(uploads), dim]: each upload's bytes decoded and embedded as the service does."""
    out = []
    for start in range(0, len(uploads), batch_size):
        part = uploads[start:start + batch_size]
        images = [runtime.transform(decode_image(data, runtime.image_size)) for data in part]
        out.append(runtime.embed(torch.stack(images))[0])
    return np.concatenate(out) if out else np.zeros((0, 2048), dtype=np.float32)


def pixels(path):
    try:
        return np.asarray(decode_image(Path(path).read_bytes()))
    except (OSError, InputError):
        return None


def nearest(queries, own_ids, reference, extra_ids, extra_vectors, count):
    """(distances, ids) [len(queries), count]: each query's nearest listings among the reference and the extra
    rows, its own listing left out, by exact distances in chunks."""
    best_d = np.full((len(queries), count), np.inf, dtype=np.float32)
    best_i = np.full((len(queries), count), "", dtype=object)
    norms = (queries ** 2).sum(axis=1, keepdims=True)
    for ids, vectors in [*reference.chunks(), (extra_ids, extra_vectors)]:
        d = norms + (vectors ** 2).sum(axis=1)[None, :] - 2.0 * queries @ vectors.T
        position = {item_id: p for p, item_id in enumerate(ids)}
        own = [(q, position[item_id]) for q, item_id in enumerate(own_ids) if item_id in position]
        if own:
            rows, columns = zip(*own)
            d[list(rows), list(columns)] = np.inf
        all_d = np.concatenate([best_d, d.astype(np.float32)], axis=1)
        all_i = np.concatenate([best_i, np.broadcast_to(np.array(ids, dtype=object), d.shape)], axis=1)
        top = np.argsort(all_d, axis=1, kind="stable")[:, :count]
        best_d, best_i = np.take_along_axis(all_d, top, 1), np.take_along_axis(all_i, top, 1)
    return best_d, best_i


def labelled_set(runtime, data_dir, listings, reference, seed=0, batch_size=64, progress=True):
    """The LabelledSet of `listings` (held-out Items, photos under data_dir): every alteration of each photo
    against its own listing, a random other listing of its category, and its NEAREST_NEGATIVES nearest other
    listings among the reference and the other held-out listings."""
    rng = np.random.default_rng(seed)
    listings = list(listings)
    data_dir = Path(data_dir)
    uploads, copy_of, alteration = [], [], []
    for number, item in enumerate(listings):
        with Image.open(data_dir / item.image) as image:
            image.load()
            for name, data, _ in altered_copies(image, rng):
                uploads.append(data)
                copy_of.append(number)
                alteration.append(name)
    if progress:
        print(f"calibration: embedding {len(listings)} held-out photos and {len(uploads)} altered copies", flush=True)
    originals = embed_uploads(runtime, [(data_dir / it.image).read_bytes() for it in listings], batch_size)
    copies = embed_uploads(runtime, uploads, batch_size)
    copy_of, alteration = np.array(copy_of), np.array(alteration)
    ids = [it.id for it in listings]
    own = [ids[n] for n in copy_of]

    pairs = {}  # (copy, listing id) -> (distance, kind)
    for c, n in enumerate(copy_of):
        pairs[(c, ids[n])] = (float(((copies[c] - originals[n]) ** 2).sum()), "copy")
    by_category = {}
    for n, item in enumerate(listings):
        by_category.setdefault(item.category, []).append(n)
    for c, n in enumerate(copy_of):
        others = [m for m in by_category[listings[n].category] if m != n]
        if others:
            m = others[int(rng.integers(len(others)))]
            pairs.setdefault((c, ids[m]), (float(((copies[c] - originals[m]) ** 2).sum()), "same-category"))
    distances, found = nearest(copies, own, reference, ids, originals, NEAREST_NEGATIVES + SPARE)

    root = Path(reference.root or data_dir)
    images = {**{item_id: root / image for item_id, image in reference.images.items()},
              **{it.id: data_dir / it.image for it in listings}}
    identical, known = set(), {}
    for c, n in enumerate(copy_of):
        kept = 0
        for d, other in zip(distances[c], found[c]):
            if kept == NEAREST_NEGATIVES or not other:
                break
            key = (ids[n], other)
            if key not in known:
                mine, theirs = pixels(data_dir / listings[n].image), pixels(images.get(other, root / "-"))
                known[key] = mine is not None and theirs is not None and mine.shape == theirs.shape and \
                    np.array_equal(mine, theirs)
            if known[key]:
                identical.add(key)
                pairs.pop((c, other), None)
                continue
            pairs.setdefault((c, other), (float(d), "nearest"))
            kept += 1
    keys = list(pairs)
    category_of = {**reference.categories, **{it.id: it.category for it in listings}}
    return LabelledSet(
        distances=np.array([pairs[k][0] for k in keys]),
        positive=np.array([pairs[k][1] == "copy" for k in keys]),
        alteration=np.array([alteration[c] for c, _ in keys]),
        kind=np.array([pairs[k][1] for k in keys]),
        category=np.array([category_of[other] for _, other in keys]),
        listings=len(listings), identical_left_out=len(identical))


def curve(distances, positive):
    """(thresholds, precision, recall) at every distinct distance, a pair counting as a match at distance <= t."""
    order = np.argsort(distances, kind="stable")
    d, pos = distances[order], positive[order]
    tp, fp = np.cumsum(pos), np.cumsum(~pos)
    last = np.r_[d[1:] != d[:-1], True]  # the last pair of each distinct distance
    return d[last], tp[last] / (tp[last] + fp[last]), tp[last] / max(1, int(pos.sum()))


def operating_point(distances, positive, target=TARGET_PRECISION):
    """(threshold, precision, recall) at the largest threshold whose precision is at least `target`; threshold
    None when no threshold reaches it."""
    thresholds, precision, recall = curve(distances, positive)
    good = np.flatnonzero((precision >= target) & (recall > 0))
    if not len(good):
        return None, float(precision.max(initial=0.0)), 0.0
    best = good[-1]
    return float(thresholds[best]), float(precision[best]), float(recall[best])


def significant(value):
    """A threshold to 6 significant digits (a fixed number of decimals would round small ones to zero)."""
    return float(f"{value:.6g}")


def thresholds_by_category(labelled, target=TARGET_PRECISION):
    """({category: operating point dict}, {category: threshold or None for those with MIN_COPIES copies}): pairs
    grouped by the listing's category, as the service applies a listing's category's threshold to it."""
    points, own = {}, {}
    for category in sorted(set(labelled.category.tolist())):
        mine = labelled.category == category
        copies = int((mine & labelled.positive).sum())
        threshold, precision, recall = operating_point(labelled.distances[mine], labelled.positive[mine], target)
        points[category] = {"copies": copies, "threshold": None if threshold is None else significant(threshold),
                            "precision": round(precision, 4), "recall": round(recall, 4)}
        if copies >= MIN_COPIES:
            own[category] = points[category]["threshold"]
    return points, own


def limits_of(labelled, by_category, threshold):
    """Each pair's threshold under the service's rule: its listing's category's, else the catalogue-wide one (-1:
    none, nothing matches)."""
    fallback = -1.0 if threshold is None else threshold
    return np.array([fallback if by_category.get(c, fallback) is None else by_category.get(c, fallback)
                     for c in labelled.category.tolist()])


def scores(matched, positive):
    tp, fp = int((matched & positive).sum()), int((matched & ~positive).sum())
    return (round(tp / (tp + fp), 4) if tp + fp else None), round(tp / max(1, int(positive.sum())), 4)


def per_alteration(labelled, limits):
    """{alteration: copies, recall and precision under `limits`, median and 90th percentile copy distance}."""
    out = {}
    for name in ALTERATIONS:
        mine = labelled.alteration == name
        if not mine.any():
            continue
        pos, d = labelled.positive[mine], labelled.distances[mine]
        precision, recall = scores(d <= limits[mine], pos)
        out[name] = {"copies": int(pos.sum()), "recall": recall, "precision": precision,
                     "median_distance": round(float(np.median(d[pos])), 6),
                     "p90_distance": round(float(np.quantile(d[pos], 0.9)), 6)}
    return out


def record_of(labelled, weights_sha256, target=TARGET_PRECISION, photos=None, seed=0):
    """What a catalogue manifest records: the thresholds (per category, and catalogue-wide for the others), the
    precision and recall they give together, per category and per alteration, and what they were measured on."""
    threshold, wide_precision, wide_recall = operating_point(labelled.distances, labelled.positive, target)
    threshold = None if threshold is None else significant(threshold)
    points, by_category = thresholds_by_category(labelled, target)
    limits = limits_of(labelled, by_category, threshold)
    precision, recall = scores(labelled.distances <= limits, labelled.positive)
    kinds = {kind: int((labelled.kind == kind).sum()) for kind in ("copy", "same-category", "nearest")}
    return {
        "threshold": threshold, "by_category": by_category,
        "precision": precision if precision is not None else round(wide_precision, 4), "recall": recall,
        "target_precision": target, "catalogue_wide": {"threshold": threshold, "precision": round(wide_precision, 4),
                                                       "recall": round(wide_recall, 4)},
        "weights_sha256": weights_sha256, "calibrated": utc_now(), "metric": "squared L2",
        "listings": labelled.listings, "pairs": kinds, "nearest_negatives": NEAREST_NEGATIVES,
        "min_copies_per_category": MIN_COPIES, "identical_photos_left_out": labelled.identical_left_out,
        "categories": points, "alterations": per_alteration(labelled, limits), "photos": photos, "seed": seed,
    }


def held_out(photos_csv, limit, seed=0):
    """Up to `limit` items of a CSV, spread over its categories (seeded)."""
    items = read_csv(photos_csv)
    categories = len({it.category for it in items})
    return subsample(items, max(1, limit // max(1, categories)), seed=seed) if limit else items


def calibrate(runtime, data_dir, photos_csv, reference, weights_sha256, listings=DEFAULT_LISTINGS,
              target=TARGET_PRECISION, seed=0, batch_size=64, progress=True):
    """(the manifest's record, the LabelledSet) for the held-out photos listed in `photos_csv` under data_dir."""
    items = held_out(photos_csv, listings, seed)
    labelled = labelled_set(runtime, data_dir, items, reference, seed, batch_size, progress)
    photos = {"list": str(Path(photos_csv).resolve()), "data_dir": str(Path(data_dir).resolve()),
              "listings": listings}
    record = record_of(labelled, weights_sha256, target, photos, seed)
    if progress:
        print(f"calibration: thresholds {record['by_category']} (catalogue-wide {record['threshold']}): precision "
              f"{record['precision']}, recall {record['recall']} ({record['pairs']['copy']} copies, "
              f"{sum(record['pairs'].values())} pairs)", flush=True)
    return record, labelled


def calibrate_model(model, preprocess, normalize, device, photos_csv, data_dir, embeddings, items, weights_sha256,
                    listings=DEFAULT_LISTINGS, target=TARGET_PRECISION, seed=0, batch_size=64, image_root=None,
                    settings=None, ir=None):
    """The calibration record of a model whose catalogue embeddings (a .npy path or an array, rows in `items`
    order, images under image_root, default data_dir) are about to be published, for publish_catalogue. The copies
    are embedded by the runtime that embedded the catalogue (`settings`, default torch fp32; `ir`: its optimize.Ir)."""
    source = TrainedModel(model, preprocess, normalize, ir.model if ir else None, ir.precision if ir else None)
    openvino = settings is not None and settings.engine == "openvino"
    runtime = Runtime(source, "cpu" if openvino else device, settings)
    reference = Reference.from_embeddings(embeddings, items, normalize, image_root)
    record, _ = calibrate(runtime, data_dir, photos_csv, reference, weights_sha256, listings, target, seed,
                          batch_size)
    return record


def table(record):
    """The per-alteration and per-category tables in markdown."""
    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    def threshold_text(value):
        return "-" if value is None else f"{value:.3g}"
    lines = ["| alteration | copies | recall | precision | median distance | 90th percentile |",
             "|---|---|---|---|---|---|"]
    for name, row in record["alterations"].items():
        lines.append(f"| {name} | {row['copies']} | {row['recall']:.3f} | {number(row['precision'])} | "
                     f"{row['median_distance']:.4f} | {row['p90_distance']:.4f} |")
    lines.append(f"| **all** | {record['pairs']['copy']} | {record['recall']:.3f} | {number(record['precision'])} | "
                 f"| |")
    lines += ["", "| category of the listing | copies | threshold | recall | precision | used |",
              "|---|---|---|---|---|---|"]
    for name, row in record["categories"].items():
        used = "its own" if name in record["by_category"] else "catalogue-wide"
        lines.append(f"| {name} | {row['copies']} | {threshold_text(row['threshold'])} | {row['recall']:.3f} | "
                     f"{row['precision']:.3f} | {used} |")
    wide = record["catalogue_wide"]
    lines.append(f"| **catalogue-wide** | {record['pairs']['copy']} | {threshold_text(wide['threshold'])} | "
                 f"{wide['recall']:.3f} | {wide['precision']:.3f} | |")
    return "\n".join(lines) + "\n"


def labelled_npz(labelled):
    """The labelled pairs as .npz bytes (plain arrays, readable without pickle), to recompute the report from."""
    buffer = io.BytesIO()
    np.savez(buffer, distances=labelled.distances, positive=labelled.positive, alteration=labelled.alteration,
             kind=labelled.kind, category=labelled.category)
    return buffer.getvalue()


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--bundle", required=True, help="the bundle whose model and catalogue to calibrate")
    p.add_argument("--data-dir", required=True, help="folder the photos' image references are relative to")
    p.add_argument("--photos", required=True, help="CSV of held-out photos, not in the catalogue (a run's val.csv)")
    p.add_argument("--listings", type=int, default=0, help="held-out photos to use (0: all of them)")
    p.add_argument("--target-precision", type=float, default=TARGET_PRECISION)
    p.add_argument("--out", required=True, help="report folder: calibration.json, table.md, precision_recall.png, "
                                                "labelled.npz")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    from training.plot import draw_precision_recall  # noqa: PLC0415 (matplotlib only for the report)

    args = get_args(argv)
    out = Path(args.out)
    if out.exists():
        sys.exit(f"error: {out} exists: a report is written once; choose a new --out")
    bundle = load_bundle(args.bundle)
    try:
        runtime = Runtime(bundle, "cuda" if torch.cuda.is_available() else "cpu")
        reference = Reference.from_catalogue(bundle.catalogue, bundle.manifest.get("image_root"))
        record, labelled = calibrate(runtime, args.data_dir, args.photos, reference, bundle.manifest["weights_sha256"],
                                     args.listings, args.target_precision, args.seed, args.batch_size)
    finally:
        bundle.catalogue.close()
    thresholds, precision, recall = curve(labelled.distances, labelled.positive)
    report = {**record, "catalogue_items": bundle.catalogue.count, "curve": {
        "threshold": np.round(thresholds, 6).tolist(), "precision": np.round(precision, 5).tolist(),
        "recall": np.round(recall, 5).tolist()}}
    with staging_folder(out) as tmp:
        write_atomically(tmp / "calibration.json", json.dumps(report, indent=1) + "\n")
        write_atomically(tmp / "table.md", table(record))
        draw_precision_recall(labelled, record, tmp / "precision_recall.png")
        write_atomically(tmp / "labelled.npz", labelled_npz(labelled))
    print(table(record))
    print(f"wrote {out / 'calibration.json'}, {out / 'table.md'}, {out / 'precision_recall.png'}")


if __name__ == "__main__":
    main()
