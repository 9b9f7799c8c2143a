"""items.sqlite: key -> (id, category code, image reference), and meta (uid, count). Workers open it read-only and
immutable, read through mmap: the pages live once in the page cache, shared by every worker."""
import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE items (key INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, category INTEGER NOT NULL, image TEXT NOT NULL);
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
BATCH = 10_000
MAX_VARIABLES = 900  # per IN (...) query, under SQLite's oldest limit of 999


def _chunks(values, size):
    values = list(values)
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _writable(path):
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = OFF")  # a new file in a build folder: nothing to roll back to
    db.execute("PRAGMA synchronous = OFF")
    return db


def create_items(path, rows, meta):
    """Writes a new items file from (key, id, category code, image) rows in ascending key order."""
    db = _writable(path)
    try:
        db.executescript(SCHEMA)
        db.execute("BEGIN")
        batch = []
        for row in rows:
            batch.append(row)
            if len(batch) == BATCH:
                _insert(db, batch)
                batch = []
        _insert(db, batch)
        db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
        db.execute("COMMIT")
    finally:
        db.close()


def _insert(db, rows):
    try:
        db.executemany("INSERT INTO items VALUES (?, ?, ?, ?)", rows)
    except sqlite3.IntegrityError as error:  # name the id that is there twice
        for key, item_id, _, _ in rows:
            other = db.execute("SELECT key FROM items WHERE id = ?", (item_id,)).fetchone()
            if other is not None and other[0] != key:
                raise ValueError(f"duplicate item id {item_id!r}") from None
        raise ValueError(f"items file: {error}") from None


def update_items(path, remove_keys, add_rows, meta):
    """Edits a private copy of an items file: deletes `remove_keys`, inserts `add_rows`, replaces meta."""
    db = _writable(path)
    try:
        db.execute("BEGIN")
        for part in _chunks(remove_keys, MAX_VARIABLES):
            db.execute(f"DELETE FROM items WHERE key IN ({','.join('?' * len(part))})", part)
        for part in _chunks(add_rows, BATCH):
            _insert(db, part)
        db.execute("DELETE FROM meta")
        db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
        db.execute("COMMIT")
    finally:
        db.close()


class ItemStore:
    """Read-only lookups in a catalogue's items file."""

    def __init__(self, path, mmap_bytes=1 << 40):
        path = Path(path).resolve()
        self.path = path
        self.db = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        self.db.execute(f"PRAGMA mmap_size = {int(mmap_bytes)}")
        self.meta = dict(self.db.execute("SELECT name, value FROM meta"))

    def keys_of(self, ids):
        """{id: key} for the ids that are in the catalogue."""
        found = {}
        for part in _chunks(dict.fromkeys(ids), MAX_VARIABLES):
            query = f"SELECT id, key FROM items WHERE id IN ({','.join('?' * len(part))})"
            found.update(self.db.execute(query, part))
        return found

    def rows_of(self, keys):
        """{key: (id, category code, image)} for the keys that are in the catalogue."""
        found = {}
        for part in _chunks(dict.fromkeys(int(k) for k in keys), MAX_VARIABLES):
            query = f"SELECT key, id, category, image FROM items WHERE key IN ({','.join('?' * len(part))})"
            found.update((key, (item_id, category, image)) for key, item_id, category, image in
                         self.db.execute(query, part))
        return found

    def iter_rows(self):
        """(key, id, category code, image) of every item, in key order (for re-embedding and listing a catalogue)."""
        yield from self.db.execute("SELECT key, id, category, image FROM items ORDER BY key")

    def count(self):
        """Rows in the file (a full count: for verification, not for every open)."""
        return self.db.execute("SELECT count(*) FROM items").fetchone()[0]

    def close(self):
        self.db.close()
