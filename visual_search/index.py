"""The FAISS catalogue index: built from any index_factory string, saved in FAISS's own format."""
import faiss
import numpy as np

from . import EMBEDDING_DIM

DEFAULT_FACTORY = "Flat"  # exact L2


def l2_normalize(vectors):
    """Unit-length rows, so that L2 ranking equals cosine ranking."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def build_index(embeddings, factory=DEFAULT_FACTORY):
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] != EMBEDDING_DIM:
        raise ValueError(f"expected embeddings of shape [N, {EMBEDDING_DIM}], got {embeddings.shape}")
    try:
        index = faiss.index_factory(EMBEDDING_DIM, factory, faiss.METRIC_L2)
    except RuntimeError as error:
        raise ValueError(f"FAISS cannot build index_factory string {factory!r}: {error}") from None
    if not index.is_trained:
        index.train(embeddings)
    index.add(embeddings)
    return index


def save_index(index, path):
    faiss.write_index(index, str(path))


def load_index(path, expected_count=None):
    """Reads an index written by save_index and checks its dimension and, if given, its size."""
    index = faiss.read_index(str(path))
    if index.d != EMBEDDING_DIM:
        raise ValueError(f"{path}: index dimension {index.d}, expected {EMBEDDING_DIM}")
    if expected_count is not None and index.ntotal != expected_count:
        raise ValueError(f"{path}: index holds {index.ntotal} vectors but the catalogue has {expected_count} items")
    return index


def search(index, queries, k):
    """(distances, positions), each [len(queries), k]; positions are -1 where the index has fewer than k items."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    return index.search(queries, k)
