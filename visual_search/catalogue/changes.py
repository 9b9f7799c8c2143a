"""The change log of a catalogue line: listings added (with their vectors) and removed since its sealed catalogues,
in SQLite in WAL mode. A write is durable when it returns (synchronous FULL); every worker of every version on
the line reads the log to keep its overlay current (visual_search.catalogue.live)."""
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import EMBEDDING_DIM
from ..errors import CatalogueError, InputError, UnknownListingError
from ..items import Item

SCHEMA = """
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('add', 'remove')),
    id TEXT NOT NULL,
    category TEXT,
    image TEXT,
    vector BLOB,
    weights TEXT,
    written REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_id ON changes (id, seq);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
CHANGES_SUFFIX = ".changes.sqlite"  # <model store>/<line><suffix>, the default place of a line's log
ROW_BYTES = EMBEDDING_DIM * 4
BUSY_MS = 30_000  # a writer waits this long for another writer's transaction


class ListingExists(InputError):
    """An add for a listing that is already live."""
    status = 409
    label = "listing_exists"


@dataclass(frozen=True)
class Change:
    seq: int
    op: str  # "add" or "remove"
    id: str
    category: str = None
    image: str = None
    vector: np.ndarray = None  # float32 [2048] for an add
    weights: str = None  # the sha256 of the weights that embedded the vector
    written: float = 0.0

    @property
    def item(self):
        return Item(self.id, self.category, self.image)


def connect(path, write=False):
    """A connection to the log at `path` in WAL mode; a reader's is query-only."""
    db = sqlite3.connect(str(path), timeout=BUSY_MS / 1000, isolation_level=None, check_same_thread=False)
    try:
        db.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
        if write:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.executescript(SCHEMA)
        else:
            db.execute("PRAGMA query_only = 1")
    except sqlite3.DatabaseError as error:
        db.close()
        raise CatalogueError(f"{path}: the change log is not a readable SQLite database ({error}); restore it from a "
                             f"backup") from None
    return db


class ChangeLog:
    """The change log of one catalogue line. Writers append in a transaction that first checks the listing's state,
    so two writers at once both land or one is refused, never mixed."""

    def __init__(self, path, write=False, line=None):
        self.path = Path(path)
        if not write and not self.path.is_file():
            raise CatalogueError(f"change log {self.path} not found")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = connect(self.path, write)
        self.meta = dict(self.db.execute("SELECT name, value FROM meta"))
        if write and line is not None and self.meta.get("line") not in (None, line):
            raise CatalogueError(f"{self.path} is the change log of line {self.meta['line']!r}, not {line!r}")
        if write and line is not None and "line" not in self.meta:
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('line', ?)", (line,))
            self.meta["line"] = line

    def close(self):
        self.db.close()

    def last_seq(self):
        return self.db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]

    def since(self, seq, until=None):
        """The changes after `seq` (up to `until`), oldest first."""
        query = "SELECT seq, op, id, category, image, vector, weights, written FROM changes WHERE seq > ?"
        args = [seq]
        if until is not None:
            query += " AND seq <= ?"
            args.append(until)
        for row in self.db.execute(query + " ORDER BY seq", args):
            yield change_of(row)

    def latest(self, item_id):
        """The last change of a listing id, or None."""
        row = self.db.execute("SELECT seq, op, id, category, image, vector, weights, written FROM changes "
                              "WHERE id = ? ORDER BY seq DESC LIMIT 1", (item_id,)).fetchone()
        return change_of(row) if row else None

    def vectors_of(self, seqs):
        """{seq: float32 [2048]} for the add changes `seqs`."""
        found = {}
        seqs = [int(s) for s in seqs]
        for start in range(0, len(seqs), 900):
            part = seqs[start:start + 900]
            for seq, blob in self.db.execute(f"SELECT seq, vector FROM changes WHERE seq IN "
                                             f"({','.join('?' * len(part))})", part):
                found[seq] = np.frombuffer(blob, dtype="<f4").copy()
        return found

    def unfolded(self, folded):
        """How many changes a catalogue that folded the log up to `folded` still has to apply."""
        return self.db.execute("SELECT count(*) FROM changes WHERE seq > ?", (folded,)).fetchone()[0]

    def append_add(self, item, vector, weights, in_base):
        """Records a new listing with its vector (float32 [2048], as the catalogue stores it). `in_base(id)` says
        whether the id is live in the line's sealed catalogue. Refuses an id that is live. Returns the seq."""
        return self.append(removes=(), adds=[(item, vector)], weights=weights, in_base=in_base)[0]

    def append_remove(self, item_id, in_base):
        """Records the removal of a live listing; UnknownListingError when it is not live. Returns the seq."""
        return self.append(removes=[item_id], adds=(), weights=None, in_base=in_base)[0]

    def append(self, removes, adds, weights, in_base):
        """Removals (ids), then additions ((Item, vector) pairs), in one transaction: all land or none. Returns
        their seqs, in that order."""
        adds = [(item, checked_vector(vector)) for item, vector in adds]
        with self.transaction():
            state, seqs = {}, []

            def live(item_id):
                return state[item_id] if item_id in state else self._is_live(item_id, in_base)

            for item_id in removes:
                if not live(item_id):
                    raise UnknownListingError(f"unknown listing id {item_id!r}: not in the catalogue")
                seqs.append(self._insert("remove", item_id, None, None, None, None))
                state[item_id] = False
            for item, vector in adds:
                if live(item.id):
                    raise ListingExists(f"listing {item.id!r} is already in the catalogue: remove it first to "
                                        f"replace it")
                seqs.append(self._insert("add", item.id, item.category, item.image, vector.tobytes(), weights))
                state[item.id] = True
            return seqs

    def transaction(self):
        return Transaction(self.db)

    def _is_live(self, item_id, in_base):
        last = self.db.execute("SELECT op FROM changes WHERE id = ? ORDER BY seq DESC LIMIT 1",
                               (item_id,)).fetchone()
        return in_base(item_id) if last is None else last[0] == "add"

    def _insert(self, op, item_id, category, image, vector, weights):
        cursor = self.db.execute("INSERT INTO changes (op, id, category, image, vector, weights, written) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)", (op, item_id, category, image, vector, weights,
                                                                  time.time()))
        return cursor.lastrowid


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT: one writer at a time, the others wait (busy_timeout); ROLLBACK on error."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, kind, error, trace):
        self.db.execute("ROLLBACK" if kind else "COMMIT")
        return False


def checked_vector(vector):
    vector = np.ascontiguousarray(vector, dtype="<f4").reshape(-1)
    if vector.shape != (EMBEDDING_DIM,) or not np.isfinite(vector).all():
        raise InputError(f"a listing's vector must be {EMBEDDING_DIM} finite floats")
    return vector


def change_of(row):
    seq, op, item_id, category, image, blob, weights, written = row
    vector = np.frombuffer(blob, dtype="<f4").copy() if blob is not None else None
    return Change(seq, op, item_id, category, image, vector, weights, written)
