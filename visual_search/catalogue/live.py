"""A sealed catalogue kept current from its line's change log: removals become a bitmap that every search excludes
inside FAISS, additions live in memory and are searched beside the sealed index, exactly, through the index's own
coarse lists when it has them; the two answers are merged by distance. The sealed files never change."""
import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .. import EMBEDDING_DIM
from ..errors import CatalogueError
from ..items import Item
from .changes import ChangeLog
from .filters import bitmap_bytes, bits_of, set_bits

EXACT_UP_TO = 4096  # a selected set this small is scanned exactly
GROWTH = 1024  # rows added to the in-memory arrays at a time


@dataclass
class OverlaySelection:
    """The added listings a request may be answered with: a mask over overlay positions, and their count."""
    mask: np.ndarray
    count: int


class Overlay:
    """Listings added to, and removed from, one sealed catalogue since it was sealed."""

    def __init__(self, catalogue, weights):
        self.catalogue, self.weights = catalogue, weights
        self.key_space = int(catalogue.manifest["key_space"])
        catalogue.removed = np.zeros(bitmap_bytes(self.key_space), dtype=np.uint8)
        catalogue.removed_counts = np.zeros(len(catalogue.categories), dtype=np.int64)
        catalogue.overlay = self
        self.vectors = np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        self.codes = np.zeros(0, dtype=np.int16)
        self.live = np.zeros(0, dtype=bool)
        self.lists = np.zeros(0, dtype=np.int64)  # the coarse list of each position (IVF catalogues)
        self.members = {}  # coarse list -> positions
        self.ids, self.images, self.by_id = [], [], {}
        self.size = 0  # positions used
        self.skipped = 0  # adds embedded by other weights, not applied
        self.ivf = catalogue.ivf

    # ------------------------------------------------------------------ applying changes

    def apply(self, change):
        if change.op == "remove":
            self.remove(change.id)
        elif change.weights != self.weights:
            self.skipped += 1  # another version's vectors: this version cannot compare them
        else:
            self.remove(change.id)  # an add of a removed id replaces it
            self.add(change.item, change.vector)

    def add(self, item, vector):
        code = self.catalogue.category_codes.get(item.category)
        if code is None:
            raise CatalogueError(f"listing {item.id!r} has category {item.category!r}, which "
                                 f"{self.catalogue.folder} does not have")
        if self.size == len(self.live):
            self._grow()
        position = self.size
        self.vectors[position] = vector
        self.codes[position], self.live[position] = code, True
        if self.ivf is not None:
            self.lists[position] = int(self._coarse(vector[None, :], 1)[1][0, 0])
            self.members.setdefault(int(self.lists[position]), []).append(position)
        self.ids.append(item.id)
        self.images.append(item.image)
        self.by_id[item.id] = position
        self.size += 1

    def remove(self, item_id):
        position = self.by_id.pop(item_id, None)
        if position is not None:
            self.live[position] = False
            return
        key = self.catalogue.items.keys_of([item_id]).get(item_id)
        if key is not None and not bits_of(self.catalogue.removed, [key])[0]:
            set_bits(self.catalogue.removed, [key], True)
            code = self.catalogue.items.rows_of([key])[key][1]
            self.catalogue.removed_counts[code] += 1

    def _grow(self):
        grow = max(GROWTH, len(self.live))
        self.vectors = np.concatenate([self.vectors, np.zeros((grow, EMBEDDING_DIM), dtype=np.float32)])
        self.codes = np.concatenate([self.codes, np.zeros(grow, dtype=np.int16)])
        self.live = np.concatenate([self.live, np.zeros(grow, dtype=bool)])
        self.lists = np.concatenate([self.lists, np.zeros(grow, dtype=np.int64)])

    # ------------------------------------------------------------------ lookups

    @property
    def count(self):
        return int(self.live[:self.size].sum())

    @property
    def removed_count(self):
        return int(self.catalogue.removed_counts.sum())

    @property
    def nbytes(self):
        return self.vectors.nbytes + self.codes.nbytes + self.live.nbytes + self.lists.nbytes

    def listing(self, item_id):
        """(key, Item) of an added listing, or None."""
        position = self.by_id.get(item_id)
        if position is None:
            return None
        return self.key_space + position, Item(item_id, self.catalogue.categories[self.codes[position]],
                                               self.images[position])

    def row(self, key):
        """(id, category code, image) of an overlay key."""
        position = key - self.key_space
        return self.ids[position], int(self.codes[position]), self.images[position]

    def vector(self, key):
        return self.vectors[key - self.key_space]

    def items(self):
        return [Item(self.ids[p], self.catalogue.categories[self.codes[p]], self.images[p])
                for p in np.flatnonzero(self.live[:self.size])]

    # ------------------------------------------------------------------ searching

    def select(self, codes=(), exclude=()):
        mask = self.live[:self.size].copy()
        if codes:
            mask &= np.isin(self.codes[:self.size], list(codes))
        for item_id in exclude:
            position = self.by_id.get(item_id)
            if position is not None:
                mask[position] = False
        return OverlaySelection(mask, int(mask.sum()))

    def search(self, queries, k, selection, nprobe=None):
        """(distances, keys) [n, min(k, selection.count)] of the added listings, nearest first, exact squared L2."""
        want = min(k, selection.count)
        n = len(queries)
        if want == 0:
            return np.zeros((n, 0), dtype=np.float32), np.zeros((n, 0), dtype=np.int64)
        if self.ivf is None or selection.count <= EXACT_UP_TO:
            return self._exact(queries, want, np.flatnonzero(selection.mask))
        nprobe = math.ceil((nprobe or self.ivf.nprobe) * self.size / max(selection.count, 1))
        distances = np.full((n, want), np.inf, dtype=np.float32)
        keys = np.full((n, want), -1, dtype=np.int64)
        rows = np.arange(n)
        while len(rows):
            probes = min(nprobe, self.ivf.nlist)
            _, lists = self._coarse(queries[rows], probes)
            for row, row_lists in zip(rows, lists):
                found = [self.members.get(int(number), ()) for number in row_lists if number >= 0]
                candidates = np.fromiter((p for part in found for p in part), dtype=np.int64)
                candidates = candidates[selection.mask[candidates]] if len(candidates) else candidates
                d, key = self._exact(queries[row:row + 1], min(want, len(candidates)), candidates)
                distances[row, :d.shape[1]], keys[row, :d.shape[1]] = d[0], key[0]
            short = (keys[rows] >= 0).sum(axis=1) < want
            rows = rows[short] if probes < self.ivf.nlist else rows[:0]
            nprobe = probes * 4
        return distances, keys

    def _exact(self, queries, k, positions):
        if k == 0 or not len(positions):
            return np.zeros((len(queries), 0), dtype=np.float32), np.zeros((len(queries), 0), dtype=np.int64)
        vectors = self.vectors[positions]
        d = np.maximum((queries ** 2).sum(axis=1, keepdims=True) + (vectors ** 2).sum(axis=1)[None, :]
                       - 2.0 * queries @ vectors.T, 0.0).astype(np.float32)  # no rounding below zero
        top = np.argsort(d, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(d, top, 1), self.key_space + positions[top]

    def _coarse(self, vectors, probes):
        """(distances, lists) of the sealed index's coarse quantizer, through its pre-transforms."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        index = self.catalogue.index
        if isinstance(index, faiss.IndexPreTransform):
            for position in range(index.chain.size()):
                x = faiss.downcast_VectorTransform(index.chain.at(position)).apply(x)
        return self.ivf.quantizer.search(x, probes)


class ChangeFollower:
    """Applies a change log to a catalogue's overlay: at open, everything after what the catalogue folded, then
    whatever is new at each refresh (one indexed query when nothing is)."""

    def __init__(self, catalogue, log_path, weights):
        self.catalogue, self.log_path = catalogue, Path(log_path)
        self.overlay = Overlay(catalogue, weights)
        self.folded = int(catalogue.manifest.get("changes_folded", 0))
        self.applied, self.lag, self.log = self.folded, 0, None
        self.refresh()

    def refresh(self):
        """Applies the changes written since the last refresh; returns how many."""
        if self.log is None:
            if not self.log_path.is_file():
                return 0  # no change has been written yet
            self.log = ChangeLog(self.log_path)
        count = 0
        for change in self.log.since(self.applied):
            self.overlay.apply(change)
            self.applied, count = change.seq, count + 1
        self.lag = count
        return count

    @property
    def unfolded(self):
        return self.applied - self.folded

    def close(self):
        if self.log is not None:
            self.log.close()
