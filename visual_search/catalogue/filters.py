"""Per-request filters as FAISS id selectors: categories and ids to leave out. categories.npy holds one bitmap per
category, uint8 [categories, ceil(key_space / 8)], bit key & 7 of byte key >> 3 (FAISS's IDSelectorBitmap layout),
memory-mapped: a one-category filter costs no copy; several categories are OR-ed per request."""
from dataclasses import dataclass, field

import faiss
import numpy as np


def bitmap_bytes(key_space):
    return (int(key_space) + 7) // 8


def category_bitmaps(codes, n_categories, key_space):
    """uint8 [n_categories, ceil(key_space / 8)] from an int array of category codes by key (-1: no item)."""
    codes = np.asarray(codes)
    out = np.zeros((n_categories, bitmap_bytes(key_space)), dtype=np.uint8)
    for code in range(n_categories):
        out[code] = np.packbits(codes == code, bitorder="little")[:out.shape[1]]
    return out


def codes_from_bitmaps(bitmaps, key_space):
    """int16 category code per key (-1: no item), the inverse of category_bitmaps."""
    codes = np.full(key_space, -1, dtype=np.int16)
    for code, row in enumerate(bitmaps):
        codes[np.flatnonzero(np.unpackbits(np.asarray(row), bitorder="little")[:key_space])] = code
    return codes


def list_category_counts(ivf, codes, n_categories):
    """int32 [nlist, categories]: how many items of each category every IVF list holds. Filtered searches use it
    to visit, nearest first, only the lists that hold matching items, until they have seen enough of them."""
    out = np.zeros((ivf.nlist, n_categories), dtype=np.int32)
    invlists = ivf.invlists
    for number in range(ivf.nlist):
        size = invlists.list_size(number)
        if size:
            ids = faiss.rev_swig_ptr(invlists.get_ids(number), size)
            out[number] = np.bincount(codes[ids], minlength=n_categories)[:n_categories]
    return out


def set_bits(bitmap, keys, value):
    keys = np.asarray(keys, dtype=np.int64)
    if value:
        np.bitwise_or.at(bitmap, keys >> 3, (1 << (keys & 7)).astype(np.uint8))
    else:
        np.bitwise_and.at(bitmap, keys >> 3, (~(1 << (keys & 7))).astype(np.uint8))


def set_keys(bitmap):
    """Sorted keys whose bit is set; only the non-zero bytes are unpacked."""
    at = np.flatnonzero(bitmap)
    rows, bits = np.nonzero(np.unpackbits(np.asarray(bitmap)[at][:, None], axis=1, bitorder="little"))
    return at[rows].astype(np.int64) * 8 + bits


def bits_of(bitmap, keys):
    keys = np.asarray(keys, dtype=np.int64)
    return ((bitmap[keys >> 3] >> (keys & 7)) & 1).astype(bool)


def popcounts(bitmaps):
    return np.bitwise_count(np.asarray(bitmaps)).sum(axis=-1, dtype=np.int64)


@dataclass
class Selection:
    """Which items a request may be answered with: `count` of them, described by an optional category bitmap and
    the keys to leave out."""
    count: int
    total: int
    bitmap: np.ndarray = None  # uint8 bytes; None: every category
    excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    codes: list = field(default_factory=list)  # the category codes chosen; empty: every category
    removed: np.ndarray = None  # uint8 bytes: keys removed since the catalogue was sealed; None: none

    @property
    def everything(self):
        return self.bitmap is None and not len(self.excluded) and self.removed is None

    def selector(self):
        """(FAISS IDSelector or None, objects to keep alive during the search)."""
        if self.everything:
            return None, []
        keep, selector = [], None
        if self.bitmap is not None:
            selector = faiss.IDSelectorBitmap(self.bitmap.shape[0], faiss.swig_ptr(self.bitmap))
            keep += [self.bitmap, selector]
        leave_outs = []
        if len(self.excluded):
            leave_outs.append(faiss.IDSelectorBatch(self.excluded))
        if self.removed is not None:
            leave_outs.append(faiss.IDSelectorBitmap(self.removed.shape[0], faiss.swig_ptr(self.removed)))
            keep.append(self.removed)
        for leave_out in leave_outs:
            kept = faiss.IDSelectorNot(leave_out)
            keep += [leave_out, kept]
            if selector is None:
                selector = kept
            else:
                selector = faiss.IDSelectorAnd(selector, kept)
                keep.append(selector)
        return selector, keep

    def allows(self, keys):
        """bool array of `keys`' shape: the key (-1: none) passes the filter."""
        keys = np.asarray(keys, dtype=np.int64)
        passes = keys >= 0
        if self.bitmap is not None:
            passes &= bits_of(self.bitmap, np.maximum(keys, 0))
        if len(self.excluded):
            passes &= ~np.isin(keys, self.excluded)
        if self.removed is not None:
            passes &= ~bits_of(self.removed, np.maximum(keys, 0))
        return passes

    def keys(self, alive):
        """Sorted keys that pass, given the bitmap of every item in the catalogue (for exact scans of small sets)."""
        keys = set_keys(alive if self.bitmap is None else self.bitmap)
        if len(self.excluded):
            keys = keys[~np.isin(keys, self.excluded)]
        if self.removed is not None:
            keys = keys[~bits_of(self.removed, keys)]
        return keys


def describe(categories, exclude):
    parts = []
    if categories:
        parts.append(f"category {', '.join(categories)}")
    if exclude:
        parts.append(f"{len(exclude)} id(s) left out")
    return " with ".join(parts) or "no filter"
