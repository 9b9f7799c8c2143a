"""Synthetic catalogues of any size from real embeddings, by neighbour interpolation: each row lies between a real
embedding and one of its neighbours, plus noise shaped like the real spread (docs/large-catalogues.md says why),
written chunk by chunk."""
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from visual_search.catalogue.vectors import SegmentWriter, l2_normalize
from visual_search.items import Item

PCA_DIMS, NEIGHBOURS, NOISE_OF_NN = 256, 10, 0.5


@dataclass
class Model:
    real: np.ndarray  # [n, 2048] unit rows
    categories: list  # per real row
    neighbours: np.ndarray  # [n, NEIGHBOURS] real row numbers
    basis: np.ndarray  # [PCA_DIMS, 2048], rows scaled by sqrt(eigenvalue) * s
    explained: float  # variance share of the top PCA_DIMS components
    nn_distance: float  # median distance of a real row to its nearest neighbour


def fit(real, categories, cache_dir=None, seed=0):
    """The generator's model of `real` (unit rows); neighbours are cached in cache_dir when given."""
    real = np.ascontiguousarray(real, dtype=np.float32)
    rng = np.random.default_rng(seed)
    sample = real[rng.choice(len(real), size=min(len(real), 20_000), replace=False)]
    mean = sample.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov((sample - mean).T).astype(np.float64))
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    explained = float(values[:PCA_DIMS].sum() / values.sum())
    cache = Path(cache_dir) / f"neighbours-{len(real)}.npy" if cache_dir else None
    if cache is not None and cache.is_file():
        neighbours = np.load(cache, allow_pickle=False)
    else:  # exact neighbours in the top-256 PCA space (cheap, and close to the full-space ones)
        projected = np.ascontiguousarray((real - mean) @ vectors[:, :PCA_DIMS].astype(np.float32))
        index = faiss.IndexFlatL2(PCA_DIMS)
        index.add(projected)
        _, found = index.search(projected, NEIGHBOURS + 1)
        neighbours = np.array([[j for j in row if j != i][:NEIGHBOURS] for i, row in enumerate(found)])
        if cache is not None:
            np.save(cache, neighbours, allow_pickle=False)
    first = neighbours[:, 0]
    nn_distance = float(np.median(np.linalg.norm(real - real[first], axis=1)))
    typical_noise = float(np.sqrt(values[:PCA_DIMS].sum()))
    scale = NOISE_OF_NN * nn_distance / typical_noise
    basis = (vectors[:, :PCA_DIMS] * np.sqrt(np.maximum(values[:PCA_DIMS], 0)) * scale).T.astype(np.float32)
    return Model(real, list(categories), neighbours, basis, explained, nn_distance)


def rows(model, count, seed, chunk=8192):
    """Yields (sources i, float32 unit rows) in chunks, `count` rows in all."""
    rng = np.random.default_rng(seed)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        i = rng.integers(0, len(model.real), n)
        j = model.neighbours[i, rng.integers(0, NEIGHBOURS, n)]
        t = rng.uniform(0.0, 1.0, (n, 1)).astype(np.float32)
        noise = rng.standard_normal((n, PCA_DIMS), dtype=np.float32) @ model.basis
        yield i, l2_normalize(model.real[i] + t * (model.real[j] - model.real[i]) + noise)


def item_id(row):
    return f"s{row:08d}"


def row_of(item_id_):
    return int(item_id_[1:])


def write(model, count, path, seed, real_items=None, progress=True):
    """Writes `count` rows to `path` (.npy) and returns their items (id s00000042, the source's category)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = SegmentWriter(path, count)
    items, row = [], 0
    with tqdm(total=count, desc=f"synthetic rows -> {path.name}", unit="rows", unit_scale=True,
              disable=not progress) as bar:
        for sources, chunk in rows(model, count, seed):
            writer.write(chunk)
            for source in sources:
                category = model.categories[source]
                image = real_items[source].image if real_items is not None else f"{category}/{item_id(row)}.png"
                items.append(Item(item_id(row), category, image))
                row += 1
            bar.update(len(chunk))
    writer.close()
    return items


def queries(model, count, seed):
    """`count` fresh rows, made like the catalogue's but with another seed (not in the catalogue)."""
    return np.concatenate([chunk for _, chunk in rows(model, count, seed)])
