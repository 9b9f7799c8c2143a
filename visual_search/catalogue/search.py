"""Searching a catalogue: exactly k neighbours whenever the filtered set holds k (IVF widened by the filter's
selectivity and again for short rows, small sets scanned exactly), approximate codes re-ranked by exact distance
against the stored vectors, so every distance answered is the exact squared L2 distance."""
import math
from dataclasses import dataclass

import faiss
import numpy as np

from .. import EMBEDDING_DIM
from ..errors import CatalogueError, InputError
from ..items import Item
from .index import search_parameters, search_preassigned
from .manifest import ITEMS_FILE

EXACT_SCAN_UP_TO = 256  # a filtered set this small is scanned exactly from the stored vectors
EXACT_SCAN_CHUNK = 16_384
MAX_EF_SEARCH = 4096
DEFAULT_FILTER_FACTOR = 2


@dataclass(frozen=True)
class Neighbour:
    id: str
    category: str
    image: str
    distance: float

    def to_dict(self):
        return {"id": self.id, "category": self.category, "distance": self.distance, "image": self.image}


@dataclass
class Hits:
    """The answer to one query: `neighbours` nearest first; len(neighbours) == min(k, available)."""
    neighbours: list
    k: int
    available: int  # items that the filter lets through: the most that could be answered
    listing: Item = None  # the listing searched by, for search by listing

    @property
    def complete(self):
        return len(self.neighbours) == min(self.k, self.available)


@dataclass(frozen=True)
class SearchRequest:
    """One request of a batch: a query vector or a listing id, k, and its filter."""
    k: int
    vector: np.ndarray = None
    listing: str = None
    categories: tuple = ()
    exclude: tuple = ()


def search_selection(catalogue, queries, k, selection):
    """(distances, keys), each [n, min(k, selection.count)], nearest first, exact squared L2 distances."""
    if k < 1:
        raise InputError(f"k must be at least 1, not {k}")
    want = min(k, selection.count)
    if not catalogue.exact_codes and selection.count <= EXACT_SCAN_UP_TO:
        return _exact_scan(catalogue, queries, want, selection.keys(catalogue.alive()))
    shortlist = want if catalogue.exact_codes else min(k * catalogue.k_factor, selection.count)
    if catalogue.ivf is not None and selection.codes:
        distances, keys = _ivf_by_category(catalogue, queries, shortlist, want, selection)
    else:
        distances, keys = _widening(catalogue, queries, shortlist, want, selection)
    if not catalogue.exact_codes:
        distances, keys = _rerank(catalogue, queries, keys, want)
    return distances[:, :want], keys[:, :want]


def _widening(catalogue, queries, shortlist, want, selection):
    """Search with nprobe / efSearch scaled by the filter's selectivity, and again, wider, for the queries
    still short of `want` results; a graph index that stays short is finished by an exact scan."""
    widen = selection.total / selection.count
    nprobe = catalogue.search_params.get("nprobe")
    ef = catalogue.search_params.get("efSearch")
    nprobe, ef = nprobe and math.ceil(nprobe * widen), ef and math.ceil(ef * widen)
    distances, keys = _faiss(catalogue, queries, shortlist, selection, nprobe, ef)
    short = np.flatnonzero((keys >= 0).sum(axis=1) < want)
    while len(short):
        at_most = (catalogue.ivf is None or nprobe is None or nprobe >= catalogue.ivf.nlist) and \
                  (ef is None or ef >= MAX_EF_SEARCH)
        if at_most:  # only a graph index or an id map over codes gets here: scan the set exactly
            d, i = _exact_scan(catalogue, queries[short], shortlist, selection.keys(catalogue.alive()))
            distances[short], keys[short] = d, i
            break
        nprobe = nprobe and min(nprobe * 4, catalogue.ivf.nlist) if catalogue.ivf is not None else None
        ef = ef and min(ef * 4, MAX_EF_SEARCH)
        d, i = _faiss(catalogue, queries[short], shortlist, selection, nprobe, ef)
        distances[short], keys[short] = d, i
        short = short[(i >= 0).sum(axis=1) < want]
    return distances, keys


def _ivf_by_category(catalogue, queries, shortlist, want, selection):
    """IVF search under a category filter: each query visits, nearest first, only the lists that hold items
    of the chosen categories, until those lists hold filter_factor times as many matching items as an
    unfiltered search scans (nprobe lists of average length); queries still short of `want` results get four
    times that budget, up to every list that holds a matching item, which is then complete."""
    ivf, index = catalogue.ivf, catalogue.index
    xq = queries
    if isinstance(index, faiss.IndexPreTransform):
        for position in range(index.chain.size()):
            xq = faiss.downcast_VectorTransform(index.chain.at(position)).apply(xq)
    quantizer_params, keep = None, []
    q_ef = catalogue.search_params.get("quantizer_efSearch")
    probes = ivf.nlist if q_ef is None else min(ivf.nlist, max(1024, q_ef))
    if q_ef is not None:
        quantizer_params = faiss.SearchParametersHNSW()
        quantizer_params.efSearch = probes
    coarse_d, coarse_i = ivf.quantizer.search(xq, probes, params=quantizer_params)
    matching = catalogue.list_counts[:, selection.codes].sum(axis=1)
    counts = np.where(coarse_i >= 0, matching[np.maximum(coarse_i, 0)], 0)
    cumulative = np.cumsum(counts, axis=1)
    budget = catalogue.search_params.get("nprobe", 1) * catalogue.count / ivf.nlist * \
        catalogue.search_params.get("filter_factor", DEFAULT_FILTER_FACTOR)
    distances = np.full((len(xq), shortlist), np.inf, dtype=np.float32)
    keys = np.full((len(xq), shortlist), -1, dtype=np.int64)
    everything = (cumulative < cumulative[:, -1:]).sum(axis=1) + 1  # lists up to the last matching one
    rows = np.arange(len(xq))
    while len(rows):
        cum = cumulative[rows]
        stop = (cum < np.minimum(budget, cum[:, -1:])).sum(axis=1) + 1
        width = int(stop.max())
        lists = np.where((np.arange(width)[None, :] < stop[:, None]) & (counts[rows, :width] > 0),
                         coarse_i[rows, :width], -1)
        selector, keep = selection.selector()
        params = faiss.SearchParametersIVF()
        params.nprobe, params.sel = width, selector
        d, i = search_preassigned(ivf, xq[rows], shortlist, lists, coarse_d[rows, :width], params)
        distances[rows], keys[rows] = d, i
        rows = rows[((i >= 0).sum(axis=1) < want) & (stop < everything[rows])]
        budget *= 4
    del keep
    short = np.flatnonzero((keys >= 0).sum(axis=1) < want)
    if len(short):  # an HNSW coarse quantizer ranks only some lists: widen over all of them
        distances[short], keys[short] = _widening(catalogue, queries[short], shortlist, want, selection)
    return distances, keys


def _faiss(catalogue, queries, k, selection, nprobe=None, ef=None):
    if not catalogue.takes_params:  # e.g. IndexPQ: a wider search, filtered after; a short row is finished exactly
        wide = min(catalogue.count, max(k, math.ceil(k * selection.total / selection.count)) + len(selection.excluded))
        distances, keys = catalogue.index.search(queries, wide)
        allowed = selection.allows(keys)
        order = np.argsort(~allowed, axis=1, kind="stable")[:, :k]
        distances = np.where(np.take_along_axis(allowed, order, 1), np.take_along_axis(distances, order, 1), np.inf)
        keys = np.where(np.take_along_axis(allowed, order, 1), np.take_along_axis(keys, order, 1), -1)
        return distances.astype(np.float32), keys
    selector, keep = selection.selector()
    params, keep_params = search_parameters(catalogue.index, selector, nprobe=nprobe, efSearch=ef,
                                            quantizer_efSearch=catalogue.search_params.get("quantizer_efSearch"))
    distances, keys = catalogue.index.search(queries, k, params=params)
    del keep, keep_params
    return distances, keys


def _exact_scan(catalogue, queries, k, keys):
    """Exact top-k of `queries` among the stored vectors of `keys`, in chunks."""
    n = len(queries)
    best_d = np.full((n, k), np.inf, dtype=np.float32)
    best_k = np.full((n, k), -1, dtype=np.int64)
    norms_q = (queries ** 2).sum(axis=1, keepdims=True)
    for start in range(0, len(keys), EXACT_SCAN_CHUNK):
        part = keys[start:start + EXACT_SCAN_CHUNK]
        vectors = catalogue.vectors.get(part)
        d = norms_q + (vectors ** 2).sum(axis=1)[None, :] - 2.0 * queries @ vectors.T
        all_d = np.concatenate([best_d, d.astype(np.float32)], axis=1)
        all_k = np.concatenate([best_k, np.broadcast_to(part, (n, len(part)))], axis=1)
        top = np.argsort(all_d, axis=1, kind="stable")[:, :k]
        best_d, best_k = np.take_along_axis(all_d, top, 1), np.take_along_axis(all_k, top, 1)
    return _rerank(catalogue, queries, best_k, k)


def _rerank(catalogue, queries, keys, k):
    """Exact squared L2 distances to the candidate keys (-1: none), sorted, the best k kept. One query at a
    time, so that the gathered vectors stay small (k * k_factor rows)."""
    distances = np.full(keys.shape, np.inf, dtype=np.float32)
    keys = np.where(keys >= 0, keys, -1)
    for row, candidates in enumerate(keys):
        valid = np.flatnonzero(candidates >= 0)
        if len(valid):
            diff = catalogue.vectors.get(candidates[valid]) - queries[row]
            distances[row, valid] = np.einsum("ij,ij->i", diff, diff)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, 1), np.take_along_axis(keys, order, 1)


def queries_of(queries):
    queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.shape[1] != EMBEDDING_DIM:
        raise InputError(f"query vectors must be [n, {EMBEDDING_DIM}], not {list(queries.shape)}")
    return queries


def hits_of(catalogue, distances, keys, k, available, listing=None):
    overlay = catalogue.overlay
    added = {int(key) for key in keys if overlay is not None and key >= overlay.key_space}
    found = [int(key) for key in keys if key >= 0 and int(key) not in added]
    rows = catalogue.items.rows_of(found)
    if len(rows) != len(found):  # the index answered a key the items file does not hold
        missing = sorted(set(found) - set(rows))
        raise CatalogueError(f"{catalogue.folder}: the index answered keys {missing[:5]} that {ITEMS_FILE} lacks")
    rows.update((key, overlay.row(key)) for key in added)
    neighbours = [Neighbour(rows[key][0], catalogue.categories[rows[key][1]], rows[key][2], float(d))
                  for d, key in zip(distances, keys) if key >= 0]
    return Hits(neighbours, k, available, listing)
