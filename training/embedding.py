"""Batch embedding of catalogue and query photos through visual_search.runtime.Runtime: the runtime that serves the
queries embeds the catalogue, with the same preprocessing and normalisation."""
import numpy as np
from tqdm import tqdm

from training.dataset import ItemDataset, make_loader


def iter_embeddings(runtime, root, items, categories, batch_size=64, workers=0, desc="embedding", progress=True):
    """Yields (embeddings float32 [b, 2048], unit length if the runtime normalises; probabilities [b, C]) batch by
    batch, in the order of `items`."""
    dataset = ItemDataset(root, items, runtime.transform, categories, decode_size=runtime.image_size)
    for images, _ in tqdm(make_loader(dataset, batch_size, workers=workers), desc=desc, unit="batch",
                          disable=not progress):
        yield runtime.embed(images)


def embed_items(runtime, root, items, categories, batch_size=64, workers=0, desc="embedding"):
    """(embeddings float32 [N, 2048], probabilities float32 [N, C]) for `items`, in their order."""
    embeddings, probabilities = zip(*iter_embeddings(runtime, root, items, categories, batch_size, workers, desc))
    return np.concatenate(embeddings), np.concatenate(probabilities)
