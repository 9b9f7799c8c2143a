"""A catalogue folder opened for serving: read-only, memory-mapped, checked cheaply, searched with filters.

    catalogue.json    manifest (visual_search.catalogue_files): format, counts, categories, index plan, files
    index.faiss       FAISS index in FAISS's own format; its int64 ids are item keys
    items.sqlite      key -> id, category, image (visual_search.item_store)
    categories.npy    one bitmap of keys per category (visual_search.catalogue_filters)
    vectors-NNNNN.npy the stored float32 vectors by key (visual_search.vector_store)

    catalogue = open_catalogue("catalogues/shop-v3")
    hits = catalogue.search(embeddings, k=4, categories=["coat"], exclude=["sku-1"])   # one Hits per row
    hits = catalogue.search_by_listing("sku-7", k=4)                                  # "more like this"
    answers = catalogue.answer([SearchRequest(k=4, vector=v), SearchRequest(k=8, listing="sku-7"), ...])

A search returns exactly k neighbours whenever the catalogue, or the part of it that the filter lets through, holds
at least k items: IVF searches widen nprobe by the filter's selectivity and then again for any query still short,
and a small filtered set is scanned exactly. Approximate codes are re-ranked by exact distance against the stored
vectors, so every distance answered is the exact squared L2 distance.
"""
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from . import EMBEDDING_DIM
from .catalogue import Item
from .catalogue_files import (CATEGORIES_FILE, INDEX_FILE, ITEMS_FILE, LISTS_FILE, MANIFEST_FILE, CatalogueError,
                              check_files, read_manifest, verify_files)
from .catalogue_filters import (FilterError, SearchError, Selection, UnknownListingError, bitmap_bytes, bits_of,
                                describe, popcounts)
from .index import apply_search_params, is_exact_codes, takes_search_params, ivf_of, open_index, search_parameters, search_preassigned
from .item_store import ItemStore
from .vector_store import Segment, VectorStore

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


REFERENCE_KEYS = ("uid", "format_version", "count", "dim", "normalized", "manifest_sha256")


def catalogue_reference(folder):
    """What an archive records about the catalogue it expects: its folder, uid, format, count, dimension,
    normalisation and the sha256 of its manifest (which holds every file's size and sha256)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    return {"path": str(folder.resolve()), **{key: manifest[key] for key in REFERENCE_KEYS[:-1]},
            "manifest_sha256": hashlib.sha256((folder / MANIFEST_FILE).read_bytes()).hexdigest()}


def check_reference(folder, manifest, expected):
    """CatalogueError naming every field where the folder differs from an archive's reference."""
    actual = {**{key: manifest.get(key) for key in REFERENCE_KEYS[:-1]},
              "manifest_sha256": hashlib.sha256((Path(folder) / MANIFEST_FILE).read_bytes()).hexdigest()}
    differ = [f"{key} {actual[key]!r}, expected {expected[key]!r}" for key in REFERENCE_KEYS
              if key in expected and actual[key] != expected[key]]
    if differ:
        raise CatalogueError(f"{folder} is not the catalogue this archive was built for: {'; '.join(differ)}")


def open_catalogue(folder, mmap=True, expect=None):
    """Opens a catalogue folder for serving, after the cheap checks; raises CatalogueError naming what differs.

    mmap=True reads the index read-only and memory-mapped (IVF lists with IO_FLAG_MMAP, Flat codes with
    IO_FLAG_MMAP_IFC), so workers on one host share one copy through the page cache.
    expect: a catalogue_reference() recorded by an archive; any difference fails the open.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if expect is not None:
        check_reference(folder, manifest, expect)
    if manifest["dim"] != EMBEDDING_DIM:
        raise CatalogueError(f"{folder}: vectors of dimension {manifest['dim']}, expected {EMBEDDING_DIM}")
    segments = [Segment.from_dict(s) for s in manifest["segments"]]
    needed = {INDEX_FILE, ITEMS_FILE, CATEGORIES_FILE, *(s.file for s in segments)}
    unlisted = sorted(needed - set(manifest["files"]))
    if unlisted:
        raise CatalogueError(f"{folder}: the manifest lists no size or checksum for {', '.join(unlisted)}")
    check_files(folder, manifest)
    end = 0
    for segment in segments:
        if segment.first_key != end:
            raise CatalogueError(f"{folder}: {segment.file} starts at key {segment.first_key}, expected {end}")
        end += segment.rows
    if end != manifest["key_space"]:
        raise CatalogueError(f"{folder}: the vector segments hold {end} keys, the manifest says {manifest['key_space']}")

    categories = manifest["categories"]
    bitmaps = np.load(folder / CATEGORIES_FILE, mmap_mode="r", allow_pickle=False)
    expected = (len(categories), bitmap_bytes(manifest["key_space"]))
    if bitmaps.dtype != np.uint8 or bitmaps.shape != expected:
        raise CatalogueError(f"{folder}: {CATEGORIES_FILE} holds {bitmaps.dtype} {bitmaps.shape}, expected uint8 "
                             f"{expected}")
    counts = popcounts(bitmaps).tolist()
    if counts != list(manifest["category_counts"]) or sum(counts) != manifest["count"]:
        raise CatalogueError(f"{folder}: {CATEGORIES_FILE} counts {counts} items per category, the manifest says "
                             f"{manifest['category_counts']} ({manifest['count']} in all)")
    try:
        vectors = VectorStore(folder, segments)
    except ValueError as error:
        raise CatalogueError(f"{folder}: {error}") from None
    items = ItemStore(folder / ITEMS_FILE)
    try:
        index, list_counts = _open_index(folder, manifest, items, mmap)
    except BaseException:
        items.close()
        vectors.close()
        raise
    return Catalogue(folder, manifest, index, items, vectors, bitmaps, list_counts)


def _open_index(folder, manifest, items, mmap):
    """(index with its search parameters applied, items per list and category or None), after checking that the
    items file, the index and lists.npy agree with the manifest."""
    if items.meta.get("uid") != manifest["items_uid"] or items.meta.get("count") != str(manifest["count"]):
        raise CatalogueError(f"{folder}: {ITEMS_FILE} belongs to item set {items.meta.get('uid')} with "
                             f"{items.meta.get('count')} items, the manifest names {manifest['items_uid']} with "
                             f"{manifest['count']}")
    try:
        index = open_index(folder / INDEX_FILE, manifest.get("mmap_flag") if mmap else None)
    except RuntimeError as error:
        raise CatalogueError(f"{folder}: FAISS cannot read {INDEX_FILE}: {str(error).splitlines()[0]}") from None
    if index.d != manifest["dim"] or index.ntotal != manifest["count"]:
        raise CatalogueError(f"{folder}: {INDEX_FILE} holds {index.ntotal} vectors of dimension {index.d}, the "
                             f"manifest says {manifest['count']} of dimension {manifest['dim']}")
    apply_search_params(index, manifest["search"])
    ivf = ivf_of(index)
    if ivf is None:
        return index, None
    if LISTS_FILE not in manifest["files"]:
        raise CatalogueError(f"{folder}: an IVF index without {LISTS_FILE} in the manifest")
    list_counts = np.load(folder / LISTS_FILE, allow_pickle=False)
    if list_counts.shape != (ivf.nlist, len(manifest["categories"])) or int(list_counts.sum()) != manifest["count"]:
        raise CatalogueError(f"{folder}: {LISTS_FILE} counts {int(list_counts.sum())} items in {list_counts.shape} "
                             f"lists x categories; the index has {ivf.nlist} lists, the manifest {manifest['count']} "
                             f"items in {len(manifest['categories'])} categories")
    return index, list_counts


def verify_catalogue(folder, progress=True):
    """The publish-time check: full sha256 of every file, then a full open. Returns the manifest."""
    manifest = read_manifest(folder)
    verify_files(folder, manifest, progress)
    catalogue = open_catalogue(folder, mmap=True)
    try:
        if catalogue.items.count() != manifest["count"]:
            raise CatalogueError(f"{folder}: {ITEMS_FILE} holds {catalogue.items.count()} items, the manifest says "
                                 f"{manifest['count']}")
    finally:
        catalogue.close()
    return manifest


class Catalogue:
    def __init__(self, folder, manifest, index, items, vectors, bitmaps, list_counts=None):
        self.folder, self.manifest, self.index = Path(folder), manifest, index
        self.list_counts = list_counts  # int32 [nlist, categories] for IVF indexes
        self.items, self.vectors, self.bitmaps = items, vectors, bitmaps
        self.categories = list(manifest["categories"])
        self.category_codes = {name: code for code, name in enumerate(self.categories)}
        self.category_counts = list(manifest["category_counts"])
        self.count = int(manifest["count"])
        self.search_params = dict(manifest["search"])
        self.k_factor = int(self.search_params.get("k_factor", 1))
        self.exact_codes = is_exact_codes(index)
        self.takes_params = takes_search_params(index)
        self.ivf = ivf_of(index)
        self._alive = None

    @property
    def uid(self):
        return self.manifest["uid"]

    @property
    def normalized(self):
        return bool(self.manifest["normalized"])

    def close(self):
        self.items.close()
        self.vectors.close()

    # ------------------------------------------------------------------ lookups

    def listing(self, item_id):
        """(key, Item) of a catalogue id; UnknownListingError when it is not in this catalogue."""
        key = self.items.keys_of([item_id]).get(item_id)
        if key is None:
            raise UnknownListingError(f"unknown listing id {item_id!r}: not in this catalogue")
        item_id, code, image = self.items.rows_of([key])[key]
        return key, Item(item_id, self.categories[code], image)

    def all_items(self):
        """Every item of this version as catalogue.Item, in key order (a full scan)."""
        return [Item(item_id, self.categories[code], image) for _, item_id, code, image in self.items.iter_rows()]

    def vector(self, item_id):
        """The stored vector of a catalogue id."""
        key, _ = self.listing(item_id)
        return self.vectors.get([key])[0]

    def alive(self):
        """Bitmap of every key in this version (all categories)."""
        if self._alive is None:
            self._alive = np.bitwise_or.reduce(np.asarray(self.bitmaps), axis=0)
        return self._alive

    def select(self, categories=(), exclude=()):
        """The Selection for a filter; FilterError for an unknown category or a filter that matches nothing."""
        categories = list(dict.fromkeys(categories or ()))
        unknown = [c for c in categories if c not in self.category_codes]
        if unknown:
            raise FilterError(f"unknown category {unknown[0]!r}; this catalogue has: {', '.join(self.categories)}")
        codes = [self.category_codes[c] for c in categories]
        bitmap = None
        if len(codes) == 1:
            bitmap = self.bitmaps[codes[0]]
        elif codes:
            bitmap = np.bitwise_or.reduce(np.asarray(self.bitmaps[codes]), axis=0)
        base = sum(self.category_counts[c] for c in codes) if codes else self.count
        excluded = np.array(sorted(self.items.keys_of(exclude or ()).values()), dtype=np.int64)
        if bitmap is not None and len(excluded):
            excluded = excluded[bits_of(bitmap, excluded)]
        count = base - len(excluded)
        if count <= 0:
            what = describe(categories, exclude)
            raise FilterError(f"no item matches the filter ({what}): "
                              + ("the category holds no items" if base == 0 else "every matching item is left out"))
        return Selection(count=count, total=self.count, bitmap=bitmap, excluded=excluded, codes=codes)

    # ------------------------------------------------------------------ searching

    def search(self, queries, k, categories=(), exclude=()):
        """One Hits per query row, nearest first, among the items the filter lets through."""
        queries = self._queries(queries)
        selection = self.select(categories, exclude)
        distances, keys = self.search_selection(queries, k, selection)
        return [self._hits(d, key_row, k, selection.count) for d, key_row in zip(distances, keys)]

    def search_by_listing(self, listing_id, k, categories=(), exclude=()):
        """Neighbours of a catalogue item's stored vector, the item itself left out."""
        key, item = self.listing(listing_id)
        hits = self.search(self.vectors.get([key]), k, categories, (*exclude, listing_id))[0]
        hits.listing = item
        return hits

    def answer(self, requests):
        """A batch of SearchRequests -> one Hits or SearchError per request, in order; requests that share a
        filter are searched together, and one bad request does not fail the others."""
        results, groups = [None] * len(requests), {}
        for i, request in enumerate(requests):
            try:
                vector, exclude, item = request.vector, tuple(request.exclude or ()), None
                if request.listing is not None:
                    key, item = self.listing(request.listing)
                    vector, exclude = self.vectors.get([key])[0], exclude + (request.listing,)
                elif vector is None:
                    raise SearchError("a search request needs a vector or a listing id")
                group = (tuple(dict.fromkeys(request.categories or ())), tuple(sorted(set(exclude))))
                groups.setdefault(group, []).append((i, vector, request.k, item))
            except SearchError as error:
                results[i] = error
        for (categories, exclude), members in groups.items():
            try:
                selection = self.select(categories, exclude)
            except SearchError as error:
                for i, *_ in members:
                    results[i] = error
                continue
            k = max(m[2] for m in members)
            distances, keys = self.search_selection(self._queries([m[1] for m in members]), k, selection)
            for (i, _, own_k, item), d, key_row in zip(members, distances, keys):
                results[i] = self._hits(d[:own_k], key_row[:own_k], own_k, selection.count, item)
        return results

    def search_selection(self, queries, k, selection):
        """(distances, keys), each [n, min(k, selection.count)], nearest first, exact squared L2 distances."""
        if k < 1:
            raise SearchError(f"k must be at least 1, not {k}")
        want = min(k, selection.count)
        if not self.exact_codes and selection.count <= EXACT_SCAN_UP_TO:
            return self._exact_scan(queries, want, selection.keys(self.alive()))
        shortlist = want if self.exact_codes else min(k * self.k_factor, selection.count)
        if self.ivf is not None and selection.codes:
            distances, keys = self._ivf_by_category(queries, shortlist, want, selection)
        else:
            distances, keys = self._widening(queries, shortlist, want, selection)
        if not self.exact_codes:
            distances, keys = self._rerank(queries, keys, want)
        return distances[:, :want], keys[:, :want]

    def _widening(self, queries, shortlist, want, selection):
        """Search with nprobe / efSearch scaled by the filter's selectivity, and again, wider, for the queries
        still short of `want` results; a graph index that stays short is finished by an exact scan."""
        widen = selection.total / selection.count
        nprobe = self.search_params.get("nprobe")
        ef = self.search_params.get("efSearch")
        nprobe, ef = nprobe and math.ceil(nprobe * widen), ef and math.ceil(ef * widen)
        distances, keys = self._faiss(queries, shortlist, selection, nprobe, ef)
        short = np.flatnonzero((keys >= 0).sum(axis=1) < want)
        while len(short):
            at_most = (self.ivf is None or nprobe is None or nprobe >= self.ivf.nlist) and \
                      (ef is None or ef >= MAX_EF_SEARCH)
            if at_most:  # only a graph index or an id map over codes gets here: scan the set exactly
                d, i = self._exact_scan(queries[short], shortlist, selection.keys(self.alive()))
                distances[short], keys[short] = d, i
                break
            nprobe = nprobe and min(nprobe * 4, self.ivf.nlist) if self.ivf is not None else None
            ef = ef and min(ef * 4, MAX_EF_SEARCH)
            d, i = self._faiss(queries[short], shortlist, selection, nprobe, ef)
            distances[short], keys[short] = d, i
            short = short[(i >= 0).sum(axis=1) < want]
        return distances, keys

    def _ivf_by_category(self, queries, shortlist, want, selection):
        """IVF search under a category filter: each query visits, nearest first, only the lists that hold items
        of the chosen categories, until those lists hold filter_factor times as many matching items as an
        unfiltered search scans (nprobe lists of average length); queries still short of `want` results get four
        times that budget, up to every list that holds a matching item, which is then complete."""
        ivf, index = self.ivf, self.index
        xq = queries
        if isinstance(index, faiss.IndexPreTransform):
            for position in range(index.chain.size()):
                xq = faiss.downcast_VectorTransform(index.chain.at(position)).apply(xq)
        quantizer_params, keep = None, []
        q_ef = self.search_params.get("quantizer_efSearch")
        probes = ivf.nlist if q_ef is None else min(ivf.nlist, max(1024, q_ef))
        if q_ef is not None:
            quantizer_params = faiss.SearchParametersHNSW()
            quantizer_params.efSearch = probes
        coarse_d, coarse_i = ivf.quantizer.search(xq, probes, params=quantizer_params)
        matching = self.list_counts[:, selection.codes].sum(axis=1)
        counts = np.where(coarse_i >= 0, matching[np.maximum(coarse_i, 0)], 0)
        cumulative = np.cumsum(counts, axis=1)
        budget = self.search_params.get("nprobe", 1) * self.count / ivf.nlist * \
            self.search_params.get("filter_factor", DEFAULT_FILTER_FACTOR)
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
            distances[short], keys[short] = self._widening(queries[short], shortlist, want, selection)
        return distances, keys

    def _faiss(self, queries, k, selection, nprobe=None, ef=None):
        if not self.takes_params:  # e.g. IndexPQ: a wider search, filtered after; a short row is finished exactly
            wide = min(self.count, max(k, math.ceil(k * selection.total / selection.count)) + len(selection.excluded))
            distances, keys = self.index.search(queries, wide)
            allowed = selection.allows(keys)
            order = np.argsort(~allowed, axis=1, kind="stable")[:, :k]
            distances = np.where(np.take_along_axis(allowed, order, 1), np.take_along_axis(distances, order, 1), np.inf)
            keys = np.where(np.take_along_axis(allowed, order, 1), np.take_along_axis(keys, order, 1), -1)
            return distances.astype(np.float32), keys
        selector, keep = selection.selector()
        params, keep_params = search_parameters(self.index, selector, nprobe=nprobe, efSearch=ef,
                                                quantizer_efSearch=self.search_params.get("quantizer_efSearch"))
        distances, keys = self.index.search(queries, k, params=params)
        del keep, keep_params
        return distances, keys

    def _exact_scan(self, queries, k, keys):
        """Exact top-k of `queries` among the stored vectors of `keys`, in chunks."""
        n = len(queries)
        best_d = np.full((n, k), np.inf, dtype=np.float32)
        best_k = np.full((n, k), -1, dtype=np.int64)
        norms_q = (queries ** 2).sum(axis=1, keepdims=True)
        for start in range(0, len(keys), EXACT_SCAN_CHUNK):
            part = keys[start:start + EXACT_SCAN_CHUNK]
            vectors = self.vectors.get(part)
            d = norms_q + (vectors ** 2).sum(axis=1)[None, :] - 2.0 * queries @ vectors.T
            all_d = np.concatenate([best_d, d.astype(np.float32)], axis=1)
            all_k = np.concatenate([best_k, np.broadcast_to(part, (n, len(part)))], axis=1)
            top = np.argsort(all_d, axis=1, kind="stable")[:, :k]
            best_d, best_k = np.take_along_axis(all_d, top, 1), np.take_along_axis(all_k, top, 1)
        return self._rerank(queries, best_k, k)

    def _rerank(self, queries, keys, k):
        """Exact squared L2 distances to the candidate keys (-1: none), sorted, the best k kept. One query at a
        time, so that the gathered vectors stay small (k * k_factor rows)."""
        distances = np.full(keys.shape, np.inf, dtype=np.float32)
        keys = np.where(keys >= 0, keys, -1)
        for row, candidates in enumerate(keys):
            valid = np.flatnonzero(candidates >= 0)
            if len(valid):
                diff = self.vectors.get(candidates[valid]) - queries[row]
                distances[row, valid] = np.einsum("ij,ij->i", diff, diff)
        order = np.argsort(distances, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(distances, order, 1), np.take_along_axis(keys, order, 1)

    def _queries(self, queries):
        queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != EMBEDDING_DIM:
            raise SearchError(f"query vectors must be [n, {EMBEDDING_DIM}], not {list(queries.shape)}")
        return queries

    def _hits(self, distances, keys, k, available, listing=None):
        found = [int(key) for key in keys if key >= 0]
        rows = self.items.rows_of(found)
        if len(rows) != len(found):  # the index answered a key the items file does not hold
            missing = sorted(set(found) - set(rows))
            raise CatalogueError(f"{self.folder}: the index answered keys {missing[:5]} that {ITEMS_FILE} lacks")
        neighbours = [Neighbour(rows[key][0], self.categories[rows[key][1]], rows[key][2], float(d))
                      for d, key in zip(distances, keys) if key >= 0]
        return Hits(neighbours, k, available, listing)
