"""Near-duplicate listings at request time: the distance threshold (calibrated with the catalogue, per category, or
given by the request), the listings within it among a search's nearest neighbours, and answers with near-duplicates
collapsed to one per group, still k. Rows search deeper only when they need to. docs/duplicates.md: the calibration."""
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import InputError
from .search import Hits

MAX_DUPLICATES = 100  # listings one duplicates answer names at most
FIRST_DEPTH = 16  # neighbours searched first for a duplicates check; deeper only while the farthest could be one
DIVERSE_DEPTH = 4  # a diverse answer first searches k times this many neighbours
MAX_DIVERSE_DEPTH = 1024  # and at most this many, when near-duplicates crowd the neighbourhood
WIDEN = 4  # each deeper search looks at this many times as many neighbours


@dataclass(frozen=True)
class Threshold:
    """The squared L2 distance under which a listing counts as a near-duplicate: its category's own, else
    `distance` (None: none), and where it comes from."""
    distance: float
    calibrated: bool  # the catalogue's calibrated thresholds; False: the request's own
    precision: float = None  # measured at calibration (calibrated thresholds only)
    recall: float = None
    by_category: dict = field(default_factory=dict, compare=False)

    def of(self, category):
        """The threshold for listings of `category` (None: no listing of it counts as a near-duplicate)."""
        return self.by_category.get(category, self.distance)

    def limit(self, category):
        value = self.of(category)
        return -1.0 if value is None else value

    def widest(self):
        """The largest threshold of any category: no listing farther than this is a near-duplicate."""
        return max((v for v in (self.distance, *self.by_category.values()) if v is not None), default=-1.0)

    def to_dict(self, category=None):
        """What an answer says: the threshold for `category` (the photo's or the listing's), and its origin."""
        value = self.of(category)
        return {"threshold": None if value is None else float(f"{value:.6g}"), "calibrated": self.calibrated,
                "per_category": bool(self.by_category), "precision": self.precision, "recall": self.recall}


def calibrated_threshold(manifest, weights_sha256):
    """The Threshold a catalogue manifest records for the model with these weights; None when it records none, or
    one calibrated for other weights (another embedding space)."""
    record = manifest.get("duplicates") or {}
    by_category = {name: None if value is None else float(value)
                   for name, value in (record.get("by_category") or {}).items()}
    known = record.get("threshold") is not None or any(value is not None for value in by_category.values())
    if not known or record.get("weights_sha256") != weights_sha256:
        return None
    distance = None if record.get("threshold") is None else float(record["threshold"])
    return Threshold(distance, True, record.get("precision"), record.get("recall"), by_category)


def no_threshold(manifest):
    """The 409 for a near-duplicate request to a catalogue without a threshold for this model."""
    record = manifest.get("duplicates") or {}
    if record.get("threshold") is not None or any(v is not None for v in (record.get("by_category") or {}).values()):
        why = "near-duplicate threshold was calibrated for other weights"
    elif record:
        why = (f"near-duplicate calibration found no threshold with precision {record.get('target_precision')} "
               f"({record.get('precision')} at best)")
    else:
        why = "catalogue has no calibrated near-duplicate threshold"
    return InputError(f"this {why}: give the distance to use with duplicate_threshold (X-Duplicate-Threshold), "
                      f"a squared L2 distance such as 0.05", 409, label="no_threshold")


@dataclass(frozen=True)
class Plan:
    """What a similar-items row asks of the catalogue beside its k nearest neighbours."""
    k: int
    threshold: Threshold = None
    duplicates: bool = False  # name the listings within the threshold
    diverse: bool = False  # collapse near-duplicates among the k answered
    category: str = None  # the photo's predicted category, whose threshold the answer names

    @property
    def extra(self):
        return self.duplicates or self.diverse

    def first_depth(self):
        depth = self.k
        if self.duplicates:
            depth = max(depth, FIRST_DEPTH)
        if self.diverse:
            depth = max(depth, self.k * DIVERSE_DEPTH)
        return depth


def plan_of(params, calibrated, manifest, category=None):
    """The Plan of a row's parameters; an InputError (409) when it needs a threshold that neither the catalogue
    (`calibrated`, a Threshold or None) nor the request gives. `category`: the photo's predicted one."""
    duplicates, diverse = bool(params.get("duplicates")), bool(params.get("diverse"))
    threshold = None
    if duplicates or diverse:
        given = params.get("duplicate_threshold")
        threshold = Threshold(float(given), False) if given is not None else calibrated
        if threshold is None:
            raise no_threshold(manifest)
    return Plan(int(params["k"]), threshold, duplicates, diverse, category)


def stored_vectors(catalogue, ids):
    """float32 [len(ids), dim]: the stored vectors of live listings, in the order of `ids` (a catalogue folder, with
    its live changes, or a Milvus collection)."""
    return catalogue.stored_vectors(ids)


def collapse(vectors, thresholds, k):
    """Positions of the rows to keep, nearest first: a row is kept when it lies farther than its threshold (one per
    row, or one for all) from every row kept before it, until k are kept. Each kept row rules out the later rows
    within their threshold of it (one matrix-vector product per kept row, not all pairs)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = (vectors.astype(np.float64) ** 2).sum(axis=1)
    open_rows = np.ones(len(vectors), dtype=bool)
    kept = []
    for position in range(len(vectors)):
        if not open_rows[position]:
            continue
        kept.append(position)
        if len(kept) == k:
            break
        distances = norms + norms[position] - 2.0 * (vectors @ vectors[position]).astype(np.float64)
        open_rows &= distances > thresholds
    return kept


def diverse_positions(catalogue, neighbours, plan):
    """collapse() over the neighbours, reading the stored vectors of a prefix at a time (4k, then 4x longer) until
    k are kept: the rows kept in a prefix are those kept in the whole list, as each depends only on earlier rows."""
    size = plan.k * DIVERSE_DEPTH
    while True:
        prefix = neighbours[:size]
        if not prefix:
            return []
        limits = np.array([plan.threshold.limit(n.category) for n in prefix])
        kept = collapse(stored_vectors(catalogue, [n.id for n in prefix]), limits, plan.k)
        if len(kept) == plan.k or size >= len(neighbours):
            return kept
        size *= WIDEN


def _within(hits, threshold):
    return [n for n in hits.neighbours if n.distance <= threshold.limit(n.category)]


def _exhausted(hits, depth):
    return len(hits.neighbours) >= hits.available or len(hits.neighbours) < depth


def _more_duplicates(plan, hits, depth):
    """Whether listings beyond the `depth` searched could still be within their threshold."""
    return not _exhausted(hits, depth) and hits.neighbours[-1].distance <= plan.threshold.widest()


def _next_depth(plan, hits, depth, kept):
    """The depth to search again at, or None when `hits` (searched at `depth`) answers the plan."""
    if _exhausted(hits, depth):
        return None  # every item the filter lets through has been seen
    wanted = []
    if plan.duplicates and depth < MAX_DIVERSE_DEPTH and len(_within(hits, plan.threshold)) <= MAX_DUPLICATES \
            and _more_duplicates(plan, hits, depth):
        wanted.append(min(depth * WIDEN, MAX_DIVERSE_DEPTH))
    if plan.diverse and len(kept) < plan.k and depth < MAX_DIVERSE_DEPTH:
        wanted.append(min(depth * WIDEN, MAX_DIVERSE_DEPTH))
    return max(wanted) if wanted else None


def _neighbour(n, threshold):
    return {**n.to_dict(), "distance": round(n.distance, 6), "threshold": threshold.to_dict(n.category)["threshold"]}


def finish(catalogue, requests, results, plans):
    """(results, extras) for a batch searched at each plan's first depth: each row's Hits cut to its k (near-
    duplicates collapsed when it asks), searched again deeper where needed, and the fields its answer adds."""
    results, extras = list(results), [{} for _ in results]
    depths = [request.k for request in requests]
    pending = [i for i, plan in enumerate(plans) if plan.extra and isinstance(results[i], Hits)]
    kept = {}
    while pending:
        deeper = {}
        for i in pending:
            hits, plan = results[i], plans[i]
            if plan.diverse:
                kept[i] = diverse_positions(catalogue, hits.neighbours, plan)
            depth = _next_depth(plan, hits, depths[i], kept.get(i, ()))
            if depth is not None:
                deeper[i] = depth
        if not deeper:
            break
        again = catalogue.answer([replace(requests[i], k=depth) for i, depth in deeper.items()])
        for (i, depth), result in zip(deeper.items(), again):
            results[i], depths[i] = result, depth
        pending = [i for i in deeper if isinstance(results[i], Hits)]
    for i, plan in enumerate(plans):
        hits = results[i]
        if not isinstance(hits, Hits):
            continue
        neighbours = hits.neighbours[:plan.k]
        named = plan.threshold and plan.threshold.to_dict(hits.listing.category if hits.listing else plan.category)
        if plan.duplicates:
            within = _within(hits, plan.threshold)
            extras[i]["duplicates"] = {**named, "listings": [_neighbour(n, plan.threshold)
                                                             for n in within[:MAX_DUPLICATES]],
                                       "more": len(within) > MAX_DUPLICATES or _more_duplicates(plan, hits, depths[i])}
        if plan.diverse:
            neighbours = [hits.neighbours[p] for p in kept[i]]
            seen = kept[i][-1] + 1 if len(kept[i]) == plan.k else len(hits.neighbours)
            extras[i]["diverse"] = {**named, "collapsed": seen - len(kept[i])}
        results[i] = Hits(neighbours, plan.k, hits.available, hits.listing)
    return results, extras
