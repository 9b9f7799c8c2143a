"""A catalogue folder opened for serving: read-only, memory-mapped, checked cheaply against its manifest and an
archive's reference. Files: catalogue.json (manifest), index.faiss, items.sqlite, categories.npy (one bitmap per
category), lists.npy (IVF), vectors-NNNNN.npy. Searching is in visual_search.catalogue.search."""
import hashlib
from pathlib import Path

import numpy as np

from .. import EMBEDDING_DIM
from ..errors import CatalogueError, FilterError, InputError, UnknownListingError
from ..items import Item
from .filters import Selection, bitmap_bytes, bits_of, describe, popcounts
from .index import apply_search_params, is_exact_codes, ivf_of, open_index, takes_search_params
from .items_db import ItemStore
from .manifest import (
    CATEGORIES_FILE,
    INDEX_FILE,
    ITEMS_FILE,
    LISTS_FILE,
    MANIFEST_FILE,
    check_files,
    read_manifest,
    verify_files,
)
from .search import SearchRequest, hits_of, queries_of, search_selection
from .vectors import Segment, VectorStore


def no_match(categories, exclude, base):
    what = describe(categories, exclude)
    return FilterError(f"no item matches the filter ({what}): "
                       + ("the category holds no items" if base == 0 else "every matching item is left out"))


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
        raise CatalogueError(f"{folder}: the vector segments hold {end} keys, the manifest says "
                             f"{manifest['key_space']}")

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
    """A sealed catalogue folder, opened; with an overlay (visual_search.catalogue.live), also the listings added
    and removed since it was sealed. `count` is the sealed count; `live_count` what a search can answer."""

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
        self.overlay = None  # set by live.Overlay, with the two below
        self.removed = None  # bitmap of the sealed keys removed since
        self.removed_counts = None  # removed keys per category code

    @property
    def uid(self):
        return self.manifest["uid"]

    @property
    def normalized(self):
        return bool(self.manifest["normalized"])

    @property
    def live_count(self):
        if self.overlay is None:
            return self.count
        return self.count - self.overlay.removed_count + self.overlay.count

    def close(self):
        self.items.close()
        self.vectors.close()

    # ------------------------------------------------------------------ lookups

    def listing(self, item_id):
        """(key, Item) of a listing; UnknownListingError when it is not in this catalogue (or was removed)."""
        found = self.overlay.listing(item_id) if self.overlay is not None else None
        if found is not None:
            return found
        key = self.items.keys_of([item_id]).get(item_id)
        if key is None or (self.removed is not None and bits_of(self.removed, [key])[0]):
            raise UnknownListingError(f"unknown listing id {item_id!r}: not in this catalogue")
        item_id, code, image = self.items.rows_of([key])[key]
        return key, Item(item_id, self.categories[code], image)

    def contains(self, item_id):
        """Whether the listing is live here."""
        try:
            self.listing(item_id)
            return True
        except UnknownListingError:
            return False

    def all_items(self):
        """Every live listing as an Item: the sealed ones in key order (a full scan), then the added ones."""
        removed = self.removed
        sealed = [Item(item_id, self.categories[code], image) for key, item_id, code, image in self.items.iter_rows()
                  if removed is None or not bits_of(removed, [key])[0]]
        return sealed + (self.overlay.items() if self.overlay is not None else [])

    def stored_vectors(self, ids):
        """float32 [len(ids), dim]: the stored vectors of live listings, sealed or added through the change log, in
        the order of `ids`."""
        overlay = self.overlay
        found = {item_id: overlay.listing(item_id) for item_id in ids} if overlay is not None else {}
        added = {item_id: hit[0] for item_id, hit in found.items() if hit is not None}
        sealed = self.items.keys_of([item_id for item_id in ids if item_id not in added])
        return self.vectors_of([added[item_id] if item_id in added else sealed[item_id] for item_id in ids])

    def vector(self, item_id):
        """The stored vector of a listing."""
        key, _ = self.listing(item_id)
        return self.vectors_of([key])[0]

    def vectors_of(self, keys):
        """float32 [len(keys), 2048]: sealed keys from the vector files, overlay keys from memory."""
        keys = np.asarray(keys, dtype=np.int64)
        if self.overlay is None or not (keys >= self.overlay.key_space).any():
            return self.vectors.get(keys)
        return np.stack([self.overlay.vector(key) if key >= self.overlay.key_space else self.vectors.get([key])[0]
                         for key in keys])

    def alive(self):
        """Bitmap of every key in this version (all categories)."""
        if self._alive is None:
            self._alive = np.bitwise_or.reduce(np.asarray(self.bitmaps), axis=0)
        return self._alive

    def select(self, categories=(), exclude=(), allow_empty=False):
        """The Selection of the sealed part for a filter; FilterError for an unknown category or, unless
        `allow_empty`, a filter that matches nothing."""
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
        removed = self.removed if self.removed_counts is not None and self.removed_counts.any() else None
        if removed is not None:
            base -= int(self.removed_counts[codes].sum() if codes else self.removed_counts.sum())
        excluded = np.array(sorted(self.items.keys_of(exclude or ()).values()), dtype=np.int64)
        if bitmap is not None and len(excluded):
            excluded = excluded[bits_of(bitmap, excluded)]
        if removed is not None and len(excluded):
            excluded = excluded[~bits_of(removed, excluded)]
        count = base - len(excluded)
        if count <= 0 and not allow_empty:
            raise no_match(categories, exclude, base)
        return Selection(count=max(count, 0), total=self.count, bitmap=bitmap, excluded=excluded, codes=codes,
                         removed=removed)

    # ------------------------------------------------------------------ searching

    def search(self, queries, k, categories=(), exclude=()):
        """One Hits per query row, nearest first, among the listings the filter lets through."""
        queries = queries_of(queries)
        results = self.answer([SearchRequest(k=k, vector=row, categories=tuple(categories),
                                             exclude=tuple(exclude)) for row in queries])
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def search_by_listing(self, listing_id, k, categories=(), exclude=()):
        """Neighbours of a listing's stored vector, the listing itself left out."""
        result = self.answer([SearchRequest(k=k, listing=listing_id, categories=tuple(categories),
                                            exclude=tuple(exclude))])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def answer(self, requests):
        """A batch of SearchRequests -> one Hits or InputError per request, in order; requests that share a
        filter are searched together, and one bad request does not fail the others."""
        results, groups = [None] * len(requests), {}
        for i, request in enumerate(requests):
            try:
                vector, exclude, item = request.vector, tuple(request.exclude or ()), None
                if request.listing is not None:
                    key, item = self.listing(request.listing)
                    vector, exclude = self.vectors_of([key])[0], exclude + (request.listing,)
                elif vector is None:
                    raise InputError("a search request needs a vector or a listing id")
                group = (tuple(dict.fromkeys(request.categories or ())), tuple(sorted(set(exclude))))
                groups.setdefault(group, []).append((i, vector, request.k, item))
            except InputError as error:
                results[i] = error
        for (categories, exclude), members in groups.items():
            try:
                distances, keys, available = self._search_group(queries_of([m[1] for m in members]),
                                                                max(m[2] for m in members), categories, exclude)
            except InputError as error:
                for i, *_ in members:
                    results[i] = error
                continue
            for (i, _, own_k, item), d, key_row in zip(members, distances, keys):
                results[i] = hits_of(self, d[:own_k], key_row[:own_k], own_k, available, item)
        return results

    def _search_group(self, queries, k, categories, exclude):
        """(distances, keys, available) of the sealed part and the overlay merged: each [n, min(k, available)]."""
        selection = self.select(categories, exclude, allow_empty=self.overlay is not None)
        if self.overlay is None:
            distances, keys = search_selection(self, queries, k, selection)
            return distances, keys, selection.count
        added = self.overlay.select(selection.codes, exclude)
        available = selection.count + added.count
        if available == 0:  # say whether the filter's categories are empty or the exclusions left nothing
            base = (self.select(categories, (), allow_empty=True).count
                    + self.overlay.select(selection.codes, ()).count) if exclude else 0
            raise no_match(categories, exclude, base)
        parts = [search_selection(self, queries, k, selection)] if selection.count else []
        if added.count:
            parts.append(self.overlay.search(queries, k, added, self.search_params.get("nprobe")))
        distances = np.concatenate([d for d, _ in parts], axis=1)
        keys = np.concatenate([key for _, key in parts], axis=1)
        order = np.argsort(distances, axis=1, kind="stable")[:, :min(k, available)]
        return np.take_along_axis(distances, order, 1), np.take_along_axis(keys, order, 1), available

    def search_selection(self, queries, k, selection):
        """(distances, keys), each [n, min(k, selection.count)], nearest first, exact squared L2 distances."""
        return search_selection(self, queries, k, selection)
