"""Batch embedding of catalogue images with the 2048-d extractor (eval mode, no grad)."""
import numpy as np
import torch
from tqdm import tqdm

from .dataset import ItemDataset, make_loader
from .preprocessing import eval_transform


@torch.inference_mode()
def iter_embeddings(model, root, items, categories, preprocess, device, batch_size=64, workers=0, desc="embedding",
                    progress=True):
    """Yields (embeddings float32 [b, 2048], logits float32 [b, C]) batch by batch, in the order of `items`."""
    model.eval().to(device)
    dataset = ItemDataset(root, items, eval_transform(preprocess), categories, decode_size=preprocess.image_size)
    for images, _ in tqdm(make_loader(dataset, batch_size, workers=workers), desc=desc, unit="batch",
                          disable=not progress):
        emb, out = model.embed_and_classify(images.to(device))
        yield emb.float().cpu().numpy(), out.float().cpu().numpy()


def embed_items(model, root, items, categories, preprocess, device, batch_size=64, workers=0, desc="embedding"):
    """(embeddings float32 [N, 2048], logits float32 [N, C]) for `items`, in their order."""
    embeddings, logits = zip(*iter_embeddings(model, root, items, categories, preprocess, device, batch_size,
                                              workers, desc))
    return np.concatenate(embeddings), np.concatenate(logits)
