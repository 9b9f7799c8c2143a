"""The stored embeddings: float32 .npy segments of consecutive keys, read with pread (never mapped). Each update adds
a segment; segments are never rewritten, so later versions share them by hard links."""
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import EMBEDDING_DIM


def l2_normalize(vectors):
    """Unit-length rows, so that L2 ranking equals cosine ranking."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


DTYPE = np.dtype("<f4")
ROW_BYTES = EMBEDDING_DIM * DTYPE.itemsize


def segment_name(number):
    return f"vectors-{number:05d}.npy"


def npy_layout(path):
    """(shape, dtype, fortran_order, data offset) of a .npy file, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{path}: unsupported .npy version {version}")
        return shape, dtype, fortran, f.tell()


class RowReader:
    """Rows of an [N, 2048] matrix: a .npy path (read with pread: nothing is mapped) or an in-memory array."""

    def __init__(self, source):
        self.array, self.fd = None, None
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"embeddings file not found: {path}")
            shape, dtype, fortran, self.offset = npy_layout(path)
            if len(shape) != 2 or shape[1] != EMBEDDING_DIM or fortran or dtype.hasobject:
                raise ValueError(f"{path}: expected a C-order [N, {EMBEDDING_DIM}] numeric array, got shape {shape}, "
                                 f"dtype {dtype}{', Fortran order' if fortran else ''}")
            self.dtype, self.shape, self.fd = dtype, shape, os.open(path, os.O_RDONLY)
            self.row_bytes = dtype.itemsize * EMBEDDING_DIM
            size = os.fstat(self.fd).st_size
            if size < self.offset + shape[0] * self.row_bytes:
                os.close(self.fd)
                raise ValueError(f"{path}: truncated: {size} bytes, its header promises {shape[0]} rows")
        else:
            array = source
            if array.ndim != 2 or array.shape[1] != EMBEDDING_DIM:
                raise ValueError(f"expected embeddings of shape [N, {EMBEDDING_DIM}], got {array.shape}")
            self.array, self.shape = array, array.shape

    def __len__(self):
        return self.shape[0]

    def rows(self, start, stop):
        """float32 rows [start, stop) as a new array."""
        if self.array is not None:
            return np.array(self.array[start:stop], dtype=np.float32)
        data = os.pread(self.fd, (stop - start) * self.row_bytes, self.offset + start * self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(stop - start, EMBEDDING_DIM).astype(np.float32)

    def take(self, positions):
        """float32 rows at sorted `positions`, read run by run."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), EMBEDDING_DIM), dtype=np.float32)
        if self.array is not None:
            out[:] = self.array[positions]
            return out
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        start = 0
        for run in np.split(positions, breaks):
            if len(run):
                out[start:start + len(run)] = self.rows(int(run[0]), int(run[-1]) + 1)
                start += len(run)
        return out

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def clean_rows(rows, first_row, normalize):
    """Checks that rows are finite, and makes them unit length if asked."""
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        raise ValueError(f"embedding row {first_row + int(np.flatnonzero(bad)[0])} holds NaN or infinity")
    return l2_normalize(rows) if normalize else np.ascontiguousarray(rows, dtype=np.float32)


class SegmentWriter:
    """Writes a float32 [rows, 2048] .npy file sequentially, chunk by chunk (ordinary writes, no mapping)."""

    def __init__(self, path, rows):
        self.path, self.rows, self.written = Path(path), int(rows), 0
        self.file = open(self.path, "wb")
        header = {"descr": DTYPE.str, "fortran_order": False, "shape": (self.rows, EMBEDDING_DIM)}
        np.lib.format.write_array_header_1_0(self.file, header)

    def write(self, chunk):
        chunk = np.ascontiguousarray(chunk, dtype=DTYPE)
        if self.written + len(chunk) > self.rows:
            raise ValueError(f"{self.path}: more rows than the {self.rows} announced")
        self.file.write(chunk.tobytes())
        self.written += len(chunk)

    def close(self):
        self.file.close()
        if self.written != self.rows:
            raise ValueError(f"{self.path}: wrote {self.written} rows of {self.rows}")


@dataclass(frozen=True)
class Segment:
    file: str
    first_key: int
    rows: int

    def to_dict(self):
        return {"file": self.file, "first_key": self.first_key, "rows": self.rows}

    @classmethod
    def from_dict(cls, values):
        return cls(str(values["file"]), int(values["first_key"]), int(values["rows"]))


class VectorStore:
    """The vectors of a catalogue folder by key, read with pread (read-only file descriptors).

    Not memory-mapped: a search reads k * k_factor scattered rows, and a mapping would count whole page-cache
    folios (up to 2 MiB each on recent kernels) in the worker's RSS for every 8 KiB row it touches. pread copies
    just the rows; the page cache still keeps them, shared by every worker.
    """

    def __init__(self, folder, segments):
        self.folder, self.segments = Path(folder), list(segments)
        self.first_keys = np.array([s.first_key for s in self.segments], dtype=np.int64)
        self.row_counts = np.array([s.rows for s in self.segments], dtype=np.int64)
        self.fds, self.offsets = [], []
        for segment in self.segments:
            path = self.folder / segment.file
            shape, dtype, fortran, offset = npy_layout(path)
            if dtype != DTYPE or fortran or tuple(shape) != (segment.rows, EMBEDDING_DIM):
                self.close()
                raise ValueError(f"{segment.file}: holds {dtype} {tuple(shape)}, the manifest says float32 "
                                 f"({segment.rows}, {EMBEDDING_DIM})")
            self.fds.append(os.open(path, os.O_RDONLY))
            self.offsets.append(offset)

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def _locate(self, keys):
        keys = np.asarray(keys, dtype=np.int64)
        which = np.searchsorted(self.first_keys, keys, side="right") - 1
        outside = (which < 0) | (keys - self.first_keys[which] >= self.row_counts[which])
        if outside.any():
            raise KeyError(f"keys outside the stored vectors: {keys[outside][:5].tolist()}")
        return keys, which

    def get(self, keys):
        """float32 [len(keys), 2048]: the stored vectors of `keys` (any order, repeats allowed)."""
        keys, which = self._locate(keys)
        out = np.empty((len(keys), EMBEDDING_DIM), dtype=np.float32)
        rows = keys - self.first_keys[which]
        for position in np.lexsort((rows, which)):  # in file order
            w = which[position]
            read = os.preadv(self.fds[w], [out[position].data], self.offsets[w] + int(rows[position]) * ROW_BYTES)
            if read != ROW_BYTES:
                raise ValueError(f"{self.segments[w].file}: short read at row {rows[position]}")
        return out

    def readers(self):
        """(segment, RowReader) pairs for bulk reads without mapping."""
        return [(segment, RowReader(self.folder / segment.file)) for segment in self.segments]

    def iter_keys(self, keys, chunk_rows):
        """Yields (keys, vectors) for sorted `keys` in chunks, read with pread."""
        keys, which = self._locate(np.sort(np.asarray(keys, dtype=np.int64)))
        for w, (segment, reader) in enumerate(self.readers()):
            try:
                mine = keys[which == w]
                for start in range(0, len(mine), chunk_rows):
                    part = mine[start:start + chunk_rows]
                    yield part, reader.take(part - segment.first_key)
            finally:
                reader.close()
